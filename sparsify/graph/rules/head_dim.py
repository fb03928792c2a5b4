"""Head-dimension slots: slot j of every head of an attention layer as one prunable structure.

Where a module writes its head count as a constant and lets the head_dim follow the width
(``view(b, s, heads, -1)``), the layout analysis (``layout._head_split``) makes the free factor, the
head_dim, the structure: channel ``h·head_dim + j`` of q (k, v) is slot j, and slot j of every head
goes together, so the reshape stays valid (uniform head_dim). Through the attention op
(``attention.scaled_dot_product_attention`` or eager matmuls) the q and k slots form one group
(q·kᵀ sums over them: a sink, removed slots must be exact zeros) and the v slots another, with the
output projection's columns (the merge back into ``heads·head_dim``). A whole head is then a barrier:
a channel space has one partition into structures, so heads and head_dim slots of one projection
cannot both be structures. SDPA's default scale 1/sqrt(current head_dim) would change: the q/k group
is exact only with an explicit ``scale=``; eager attention multiplies by a constant already.

Rotary embeddings (LLaMA's ``rotate_half``: ``x[..., :d // 2]``, ``x[..., d // 2:]``) slice the
head_dim into halves. A slice whose bounds follow the width (the sliced dim's size d or d // m, read
from the sliced tensor's shape, or literals in a module type declared with synced sizes) and that
selects a block ``[i·d/n, (i+1)·d/n)`` couples slot j with slots ``j mod d/n`` of every block
(``common.couple_slice``, used by the layout analysis):
removing the same positions from every block keeps each slice selecting the same kept channels.

A size read into a computed value (``scores / q.size(-1) ** 0.5``) would change with pruning:
:func:`mark_width_reads` (called by the ``shape_query`` rule) marks such a dim inexact.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from sparsify.graph.builder import OpContext
from sparsify.graph.op_rules import find_rule
from sparsify.graph.rules.layout_chain import is_layout

_SHAPE_ARITHMETIC = (operator.floordiv, operator.mul, operator.add, operator.sub, operator.mod, operator.neg)
_SIZED_RULES = ("layout", "layout_aten", "split")
_SHAPE_CHECKS = (torch._assert, operator.eq, operator.ne, operator.lt, operator.le, operator.gt, operator.ge)


def _sizes_op(ctx: OpContext, node: fx.Node) -> bool:
    """An op whose rule judges the sizes passed to it (views, slices, split): a computed size is fine there."""
    if is_layout(node, ctx):
        return True
    rule = find_rule(node, ctx.traced.graph_module)
    return rule is not None and rule.kind in _SIZED_RULES


def _reaches(ctx: OpContext, node: fx.Node, pos: int | bool | None, seen: set[str]) -> str:
    """Follow a size through the graph: ``node``'s value holds it at tuple position ``pos`` (True: the
    value is the size, or computed from it; None: somewhere in a tuple). Returns "" if it only sizes
    layout ops (views, slice bounds: the layout rule judges those) or checks, else the node that
    computes something else with it."""
    value = ctx.value(node)
    for user in node.users:
        if user.name in seen:
            continue
        seen.add(user.name)
        new: int | bool | None = True
        if user.op == "call_function" and user.target in _SHAPE_CHECKS:
            continue
        if (user.op == "call_function" and user.target is operator.getitem and user.args[0] is node
                and isinstance(value, (tuple, list)) and pos is not True):
            k = user.args[1]
            if isinstance(k, int):
                if pos is not None and k % len(value) != pos:
                    continue
            elif isinstance(k, slice):
                kept = list(range(len(value)))[k]
                if pos is not None and pos not in kept:
                    continue
                new = kept.index(pos) if pos is not None else None
            else:
                return user.name
        elif _sizes_op(ctx, user):
            continue
        elif user.op == "call_function" and user.target in _SHAPE_ARITHMETIC:
            new = True if isinstance(ctx.value(user), (int, float)) else None
        else:
            return user.name
        why = _reaches(ctx, user, new, seen)
        if why:
            return why
    return ""


def mark_width_reads(ctx: OpContext) -> None:
    """A tensor's size read into a value the model computes with (``scores / q.size(-1) ** 0.5``)
    changes when that dim is pruned: mark the dim inexact. Sizes of views and slice bounds are left
    to the layout rule. (Head_dim slots made this common: eager attention scales read the head_dim.)"""
    node = ctx.node
    x = node.args[0] if node.args else None
    info = ctx.info(x)
    if info is None or not info.ndim:
        return
    reads: dict[int, int | bool] = {}
    if node.op == "call_method" and node.target == "size" and (len(node.args) > 1 or "dim" in node.kwargs):
        d = node.args[1] if len(node.args) > 1 else node.kwargs["dim"]
        if isinstance(d, int):
            reads = {d % info.ndim: True}
    elif (node.op == "call_method" and node.target == "size") or (
            node.op == "call_function" and node.target is getattr and node.args[1:] == ("shape",)):
        reads = {d: d for d in range(info.ndim)}
    elif node.op == "call_method" and node.target in ("numel", "nelement"):
        reads = {d: True for d in range(info.ndim)}
    for d, pos in reads.items():
        why = _reaches(ctx, node, pos, set())
        if why:
            ctx.mark_inexact(ctx.space(x, d), f"{ctx.describe()} reads the size of dim {d} into '{why}', a "
                                              "value that changes when that dim is pruned")
