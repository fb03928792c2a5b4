"""Attention: whole heads (or grouped-query KV groups) as prunable structures.

The head dim of q, k, v and the output of an attention op is a batch-like dim: head h of the output
depends only on head h of q, k and v (with grouped-query attention, query head h reads KV head
``h // (nH / nKV)``). Together with the layout analysis — a channel dim split by
``view(b, s, -1, head_dim)`` couples each head's channels with one position of the head dim, and the
merge back (``transpose + reshape(b, s, -1)``) gives the output projection's input columns to the
heads — one group per attention layer results: its structures are the heads (``kind="head"``) or
the KV groups (``kind="kv_group"``, a KV head with its query heads); its members are the q/k/v rows
(blocks of head_dim), their biases and the output projection's columns. head_dim stays a barrier:
every head must keep the same size (a module with a constant head count gets head_dim slots instead,
see ``head_dim.py``). Softmax over keys keeps the sequence dims out of it.

This module registers the SDPA rule (``F.scaled_dot_product_attention`` and its ATen overload), a
matmul rule that labels the heads of eager attention (matmul → softmax → matmul), ``aten.addmm``
(Hugging Face ``Conv1D``). Which Hugging Face modules compute their view sizes from shapes or
synced attributes is declared in ``sparsify.hf.syncs``.
"""

from __future__ import annotations

import operator
from typing import Any

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F

from sparsify.graph.builder import OpContext, Space
from sparsify.graph.op_rules import register_op_rule
from sparsify.graph.rules import structural
from sparsify.graph.rules.common import couple_elementwise
from sparsify.graph.rules.layout_chain import index_tensor, is_layout

aten = torch.ops.aten


def _repeated(ctx: OpContext, node: Any, dim: int) -> bool:
    """Whether positions of ``node``'s dim ``dim`` repeat the same elements of a layout chain's root
    (``repeat_kv``: several query heads read one KV head)."""
    if not isinstance(node, fx.Node) or not is_layout(node, ctx):
        return False
    try:
        _, idx, _, _ = index_tensor(ctx, node)
    except Exception:  # a chain the layout rule cannot replay is not a repeat we know
        return False
    rows = idx.movedim(dim, 0).reshape(idx.shape[dim], -1)
    return len(torch.unique(rows, dim=0)) < rows.shape[0]


def _label_heads(ctx: OpContext, head: Space | None, k: Any, dim: int, gqa: bool = False) -> None:
    ctx.label(head, "kv_group" if gqa or _repeated(ctx, k, dim) else "head")


def scaled_dot_product_attention(ctx: OpContext) -> None:
    """SDPA on (..., heads, L, E) tensors: heads pass through (GQA: query head h reads KV head
    h // (nH / nKV)); q·kᵀ contracts E; keys and values share the sequence dim S.

    With the default scale 1/sqrt(E), removing E channels changes the scale (inexact); heads are
    exact. An attention mask is coupled dim by dim (a per-head mask follows the heads)."""
    q, k, v = (ctx.arg(i, name) for i, name in enumerate(("query", "key", "value")))
    qi, ki, vi, out = ctx.info(q), ctx.info(k), ctx.info(v), ctx.out_info
    if qi is None or ki is None or vi is None or out is None or not qi.ndim == ki.ndim == vi.ndim >= 2:
        ctx.block_all(f"{ctx.describe()}: expected q, k, v of the same rank ≥ 2")
        return
    nd = qi.ndim
    for x, xi in ((q, qi), (k, ki), (v, vi)):
        for d in range(nd - (3 if nd >= 4 else 2)):
            if xi.shape[d] == out.shape[d]:
                ctx.same(ctx.space(x, d), ctx.out(d))
    if nd >= 4:
        h = nd - 3
        hq, hk, hv = qi.shape[h], ki.shape[h], vi.shape[h]
        gqa = bool(ctx.node.kwargs.get("enable_gqa", False)) and hk == hv and hk < hq and hq % hk == 0
        if hq == hk == hv:
            for x in (q, k, v):
                ctx.same(ctx.space(x, h), ctx.out(h))
        elif hq > 1 and hk == hv == 1:  # multi-query attention, broadcast: no head of q can go alone
            ctx.block(ctx.space(q, h), f"{ctx.describe()}: {hq} query heads share one key/value head; a query "
                                       "head with zero weights still outputs the mean of the values")
        elif gqa:
            ctx.same(ctx.space(q, h), ctx.out(h))
            ctx.same(ctx.space(k, h), ctx.space(v, h))
            ctx.pairs(ctx.space(k, h), ctx.out(h), np.arange(hq) // (hq // hk), np.arange(hq))
        else:
            reason = f"{ctx.describe()}: head counts of q, k, v ({hq}, {hk}, {hv}) do not match"
            for x in (q, k, v):
                ctx.block(ctx.space(x, h), reason)
        _label_heads(ctx, ctx.out(h), k, h, gqa)
    ctx.same(ctx.space(q, -2), ctx.out(-2))
    ctx.same(ctx.space(k, -2), ctx.space(v, -2))
    ctx.mark_inexact(ctx.space(k, -2), f"{ctx.describe()} takes a softmax over keys")
    ctx.same(ctx.space(q, -1), ctx.space(k, -1))
    ctx.sink(ctx.space(q, -1), f"{ctx.describe()} contracts queries with keys over this dim")
    ctx.same(ctx.space(v, -1), ctx.out(-1))
    if ctx.node.kwargs.get("scale") is None and len(ctx.node.args) < 7:
        ctx.mark_inexact(ctx.space(q, -1), f"{ctx.describe()} scales by 1/sqrt(head_dim) of the current width "
                                           "(its default scale); pass scale=head_dim ** -0.5 (the original "
                                           "head_dim) to prune head_dim slots exactly")
    _couple_mask(ctx, ctx.arg(3, "attn_mask"), nd, q, k)


def _couple_mask(ctx: OpContext, mask: Any, nd: int, q: Any, k: Any) -> None:
    """A mask broadcast against (..., heads, L, S): its dims are the output's (S: the keys')."""
    mi = ctx.info(mask)
    if mi is None:
        return
    for d in range(mi.ndim):
        od = nd - mi.ndim + d
        if od < 0 or mi.shape[d] <= 1:
            continue
        ctx.same(ctx.space(mask, d), ctx.space(k, -2) if od == nd - 1 else ctx.out(od))


register_op_rule("scaled_dot_product_attention", scaled_dot_product_attention,
                 functions=(F.scaled_dot_product_attention,))
register_op_rule("aten_sdpa", scaled_dot_product_attention,
                 functions=tuple(getattr(aten.scaled_dot_product_attention, n)
                                 for n in aten.scaled_dot_product_attention.overloads()))


def matmul(ctx: OpContext) -> None:
    """a @ b (see ``structural.matmul``); a product of two activations of rank ≥ 4 is eager
    attention (q @ kᵀ, weights @ v): its dim -3 is the heads, labelled as such."""
    structural.matmul(ctx)
    a, b = ctx.node.args[0], ctx.node.args[1]
    ai, bi, out = ctx.info(a), ctx.info(b), ctx.out_info
    if ai is None or bi is None or out is None or ctx.param_name(a) or ctx.param_name(b):
        return
    for x, xi, yi in ((a, ai, bi), (b, bi, ai)):  # a batch channel multiplied by a broadcast operand
        for d in range(xi.ndim - 2):
            od = d + out.ndim - xi.ndim
            yd = od - (out.ndim - yi.ndim)
            if xi.shape[d] > 1 and (yd < 0 or yi.shape[yd] == 1):
                ctx.sink(ctx.space(x, d), f"{ctx.describe()} multiplies this dim's channels with a broadcast "
                                          "operand: a constant there (softmax of zeros) gives a varying output")
    if ai.ndim == bi.ndim == out.ndim >= 4:
        _label_heads(ctx, ctx.out(-3), b, bi.ndim - 3)


def _overloads(*packets: Any) -> tuple[Any, ...]:
    return tuple(getattr(p, n) for p in packets for n in p.overloads())


register_op_rule("matmul", matmul, functions=(torch.matmul, torch.bmm, torch.mm, operator.matmul),
                 methods=("matmul", "bmm", "mm"), override=True)
register_op_rule("aten_matmul", matmul, functions=_overloads(aten.matmul, aten.bmm, aten.mm), override=True)


def addmm(ctx: OpContext) -> None:
    """addmm(input, mat1, mat2) = input + mat1 @ mat2 (Hugging Face ``Conv1D``: bias, x, weight):
    mat2's rows consume mat1's columns, its columns make the output's; a 1-D ``input`` read from a
    parameter is the bias."""
    bias, x, w = ctx.node.args[:3]
    xi, wi, out = ctx.info(x), ctx.info(w), ctx.out_info
    if xi is None or wi is None or out is None or xi.ndim != 2:
        ctx.block_all(f"{ctx.describe()}: expected 2-D operands")
        return
    ctx.same(ctx.space(x, 0), ctx.out(0))
    if ctx.param_name(w) is None:
        ctx.block_all(f"{ctx.describe()}: mat2 is computed, not a parameter")
        return
    ctx.param_member(w, 0, ctx.space(x, 1), "in")
    ctx.param_member(w, 1, ctx.out(1), "out")
    bi = ctx.info(bias)
    if bi is None:
        return
    if bi.ndim == 1 and ctx.param_member(bias, 0, ctx.out(1), "bias"):
        return
    couple_elementwise(ctx, bias)


register_op_rule("aten_addmm", addmm, functions=_overloads(aten.addmm))
