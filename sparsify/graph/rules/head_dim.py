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
from the sliced tensor's shape, or literals in a module registered with
``layout.register_synced_sizes``) and that selects a block
``[i·d/n, (i+1)·d/n)`` couples slot j with slots ``j mod d/n`` of every block (:func:`couple_slice`):
removing the same positions from every block keeps each slice selecting the same kept channels.

A size read into a computed value (``scores / q.size(-1) ** 0.5``) would change with pruning:
:func:`mark_width_reads` (called by the ``shape_query`` rule) marks such a dim inexact.
"""

from __future__ import annotations

import operator
from typing import Any

import numpy as np
import torch
import torch.fx as fx

from sparsify.graph.builder import OpContext, Space
from sparsify.graph.rules import layout
from sparsify.graph.rules.registry import find_rule


def _size_of(node: Any, x: fx.Node, dim: int, ndim: int) -> bool:
    """Whether ``node`` is ``x.shape[dim]`` or ``x.size(dim)`` (dim counted from either end)."""
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_method" and node.target == "size" and node.args[0] is x and len(node.args) == 2:
        k = node.args[1]
    elif (node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[0], fx.Node)
          and node.args[0].op == "call_function" and node.args[0].target is getattr
          and node.args[0].args == (x, "shape")):
        k = node.args[1]
    else:
        return False
    return isinstance(k, int) and -ndim <= k < ndim and k % ndim == dim


def _bound_follows(ctx: OpContext, node: fx.Node, bound: Any, dim: int) -> bool:
    """Whether a slice bound of ``node`` (slicing its input's dim ``dim``) scales with the width: None,
    the dim's size d or d // m read from the sliced tensor's shape, or a literal in a module whose sizes
    are synced (torch.export writes every bound as a literal)."""
    if bound is None:
        return True
    if isinstance(bound, fx.Node):
        x, info = node.args[0], ctx.info(node.args[0])
        if bound.op == "call_function" and bound.target is operator.floordiv and isinstance(bound.args[1], int):
            bound = bound.args[0]
        return info is not None and _size_of(bound, x, dim, info.ndim)
    return isinstance(bound, int) and (bound == 0 or layout.sizes_are_synced(node))


def _slices(ctx: OpContext, node: fx.Node) -> list[tuple[int, list[Any]]]:
    """(sliced dim, its bounds) of every slice a getitem or ``aten.slice`` node takes."""
    if node.op == "call_function" and node.target is operator.getitem:
        index = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
        info = ctx.info(node.args[0])
        ndim = info.ndim if info is not None else 0
        ellipsis = next((k for k, s in enumerate(index) if s is Ellipsis), None)
        found = []
        for k, s in enumerate(index):
            if isinstance(s, slice):
                dim = ndim - (len(index) - k) if ellipsis is not None and k > ellipsis else k
                found.append((dim, [s.start, s.stop, s.step]))
        return found
    if isinstance(node.target, torch._ops.OpOverload) and node.target.overloadpacket.__name__ == "slice":
        return [(int(node.args[1]) if len(node.args) > 1 else 0, list(node.args[2:]))]
    return []


def _slice_bounds_follow(ctx: OpContext, exit_node: fx.Node) -> str:
    """"" if every slice on the chain to ``exit_node`` has bounds that scale with the width, else why not."""
    for node in layout._chain(ctx, exit_node):
        for dim, bounds in _slices(ctx, node):
            for b in bounds:
                if not _bound_follows(ctx, node, b, dim):
                    return (f"'{node.name}' slices with the bound {b!r}, which does not follow pruning; compute "
                            "it from the tensor's shape (x[..., : x.shape[-1] // 2])")
    return ""


def couple_slice(ctx: OpContext, exit_node: fx.Node, space: Space, head_of: np.ndarray, first: np.ndarray,
                 a: np.ndarray, slots: int) -> str:
    """The exit selects slots ``a`` (each once) of ``slots`` head_dim slots: if they are a block
    ``[i·n, (i+1)·n)`` with n dividing ``slots`` and the slice bounds follow pruning, couple every
    slot with the slots at the same position of the other blocks (rotary halves: j and j + d/2).
    Returns "" when coupled, else why not."""
    n = len(a)
    if not (np.array_equal(a, np.arange(a[0], a[0] + n)) and slots % n == 0 and a[0] % n == 0):
        return f"it selects head_dim slots {a.tolist()}, not one of {slots // max(n, 1)} equal blocks"
    why = _slice_bounds_follow(ctx, exit_node)
    if why:
        return why
    position = head_of % n  # a channel's slot position within its block
    ctx.pairs(space, space, first[position], np.arange(len(head_of)))
    return ""


_SHAPE_ARITHMETIC = (operator.floordiv, operator.mul, operator.add, operator.sub, operator.mod, operator.neg)
_SIZED_RULES = ("layout", "layout_aten", "split")
_SHAPE_CHECKS = (torch._assert, operator.eq, operator.ne, operator.lt, operator.le, operator.gt, operator.ge)


def _sizes_op(ctx: OpContext, node: fx.Node) -> bool:
    """An op whose rule judges the sizes passed to it (views, slices, split): a computed size is fine there."""
    if layout._is_layout(node, ctx):
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
