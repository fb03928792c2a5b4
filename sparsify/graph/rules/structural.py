"""Concat, split/chunk, reductions, softmax, matmul and attention."""

from __future__ import annotations

import operator

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from sparsify.graph.builder import OpContext
from sparsify.graph.module_types import sizes_are_synced
from sparsify.graph.op_rules import register_op_rule
from sparsify.graph.rules.common import couple_elementwise


def cat(ctx: OpContext) -> None:
    """Concatenation: input k's channels sit at an offset in the output's channels."""
    tensors = ctx.value(ctx.arg(0, "tensors"))
    nodes = ctx.arg(0, "tensors")
    dim = ctx.value(ctx.arg(1, "dim", 0))
    out = ctx.out_info
    if out is None:
        return
    dim %= out.ndim
    offset = 0
    for node, info in zip(nodes, tensors, strict=True):
        if info.shape == (0,) and out.ndim > 1:  # torch.cat skips a 1-D empty input (an empty HF cache layer)
            continue
        for d in range(out.ndim):
            if d != dim:
                ctx.same(ctx.space(node, d), ctx.out(d))
        w = info.shape[dim]
        if w == 1:
            ctx.block(ctx.out(dim), f"{ctx.describe()} concatenates a single-channel input")
        else:
            ctx.pairs(ctx.space(node, dim), ctx.out(dim), np.arange(w), offset + np.arange(w))
        offset += w


register_op_rule("cat", cat, functions=(torch.cat, torch.concat, torch.concatenate))


def split(ctx: OpContext) -> None:
    """chunk/split into equal parts: part k's channels are an offset range of the input's.

    Every part must keep the same width after pruning, so channel j of each part is one structure.
    That holds for a number of parts (chunk, tensor_split into n) and a part size computed from
    shapes; a split into unequal parts or parts of a hard-coded size is a barrier. Exception: a list
    of part sizes inside a module type declared with synced sizes (the module keeps them in
    sync with the weights): each part then shrinks on its own.
    """
    x = ctx.node.args[0]
    xi = ctx.info(x)
    out = ctx.value(ctx.node)
    if xi is None or not isinstance(out, (tuple, list)):
        return
    name = ctx.op_name
    dim = ctx.value(ctx.arg(2, "dim", 0)) % xi.ndim
    size = ctx.arg(1, {"chunk": "chunks", "tensor_split": "indices_or_sections"}.get(name, "split_size"))
    if size is None and name == "split":
        size = ctx.node.kwargs.get("split_size_or_sections")
    widths = [o.shape[dim] for o in out]
    x_space = ctx.space(x, dim)
    if isinstance(size, (list, tuple)) and name in ("split", "split_with_sizes") and sizes_are_synced(ctx.node):
        _independent_parts(ctx, x, xi.ndim, dim, widths)  # part sizes read from synced attributes
        return
    if name == "split":  # a part size: only one computed from shapes (or a synced attribute) shrinks
        scales = isinstance(size, fx.Node) or sizes_are_synced(ctx.node)
    else:  # a number of parts (tensor_split also takes a list of split indices)
        scales = name == "chunk" or isinstance(ctx.value(size), int)
    equal = len(set(widths)) == 1 and scales
    offset = 0
    for k, w in enumerate(widths):
        for d in range(xi.ndim):
            if d != dim:
                ctx.same(ctx.space(x, d), ctx.out(d, element=k))
        part = ctx.out(dim, element=k)
        if equal and w > 1:
            ctx.pairs(x_space, part, offset + np.arange(w), np.arange(w))
            if k:
                ctx.pairs(x_space, x_space, np.arange(w), offset + np.arange(w))
        else:
            reason = f"{ctx.describe()} splits dim {dim} into parts of unequal or hard-coded sizes {widths}"
            ctx.block(part, reason)
            ctx.block(x_space, reason)
        offset += w


def _independent_parts(ctx: OpContext, x: fx.Node, ndim: int, dim: int, widths: list[int]) -> None:
    """A split into a list of part sizes that the module keeps in sync with the weights (a module
    declared with synced sizes, e.g. GPT-2 q|k|v of different head_dims): each part
    shrinks on its own."""
    offset = 0
    for k, w in enumerate(widths):
        for d in range(ndim):
            if d != dim:
                ctx.same(ctx.space(x, d), ctx.out(d, element=k))
        ctx.pairs(ctx.space(x, dim), ctx.out(dim, element=k), offset + np.arange(w), np.arange(w))
        offset += w


register_op_rule("split", split, functions=(torch.chunk, torch.split, torch.tensor_split),
                 methods=("chunk", "split"))


def reduction(ctx: OpContext) -> None:
    """mean/sum/amax over some dims: kept dims pass through; reducing a channel dim by mean is inexact."""
    x = ctx.node.args[0]
    xi, out = ctx.info(x), ctx.out_info
    if xi is None or out is None:
        return
    dims = ctx.value(ctx.arg(1, "dim"))
    keepdim = bool(ctx.value(ctx.arg(2, "keepdim", False)))
    dims = range(xi.ndim) if dims is None else dims if isinstance(dims, (list, tuple)) else [dims]
    reduced = {d % xi.ndim for d in dims}
    name = ctx.op_name
    j = 0
    for d in range(xi.ndim):
        if d in reduced:
            if name != "sum":
                ctx.mark_inexact(ctx.space(x, d), f"{ctx.describe()} reduces over dim {d} by {name}")
            ctx.sink(ctx.space(x, d), f"{ctx.describe()} sums over dim {d}")
            if keepdim:
                j += 1
            continue
        ctx.same(ctx.space(x, d), ctx.out(j))
        j += 1


register_op_rule("reduction", reduction, functions=(torch.mean, torch.sum, torch.amax, torch.amin),
                 methods=("mean", "sum", "amax", "amin"))


def softmax(ctx: OpContext) -> None:
    """Softmax along ``dim`` mixes that dim's channels; other dims pass through."""
    x = ctx.tensor_args()[0]
    couple_elementwise(ctx, x)
    if ctx.node.op == "call_module":
        dim = ctx.module.dim
    else:
        dim = ctx.value(ctx.arg(1, "dim"))
    if dim is not None:
        ctx.mark_inexact(ctx.out(dim), f"{ctx.describe()} normalises over dim {dim}")


register_op_rule("softmax", softmax, modules=(nn.Softmax, nn.LogSoftmax, nn.Softmin),
                 functions=(F.softmax, F.log_softmax, torch.softmax, torch.log_softmax),
                 methods=("softmax", "log_softmax"))


def matmul(ctx: OpContext) -> None:
    """a @ b: batch dims broadcast, a's last dim is contracted with b's second-to-last."""
    a, b = ctx.node.args[0], ctx.node.args[1]
    ai, bi, out = ctx.info(a), ctx.info(b), ctx.out_info
    if ai is None or bi is None or out is None or ai.ndim < 2 or bi.ndim < 2:
        ctx.block_all(f"{ctx.describe()}: only matrix products of 2-D or batched operands are supported")
        return
    for x, xi in ((a, ai), (b, bi)):
        offset = out.ndim - xi.ndim
        for d in range(xi.ndim - 2):
            if xi.shape[d] == out.shape[d + offset]:
                ctx.same(ctx.space(x, d), ctx.out(d + offset))
    rows, cols, ka, kb = ctx.space(a, -2), ctx.space(b, -1), ctx.space(a, -1), ctx.space(b, -2)
    ctx.same(rows, ctx.out(-2))
    ctx.same(cols, ctx.out(-1))
    ctx.same(ka, kb)
    if ctx.param_name(a) is None and ctx.param_name(b) is None:
        ctx.sink(ka, f"{ctx.describe()} contracts this dim between two activations")
    ctx.param_member(a, ai.ndim - 2, rows, "out")
    ctx.param_member(a, ai.ndim - 1, ka, "in")
    ctx.param_member(b, bi.ndim - 1, cols, "out")
    ctx.param_member(b, bi.ndim - 2, kb, "in")


register_op_rule("matmul", matmul, functions=(torch.matmul, torch.bmm, torch.mm, operator.matmul),
                 methods=("matmul", "bmm", "mm"))


# scaled_dot_product_attention: see rules/attention.py (heads, grouped-query attention)


def opaque(ctx: OpContext) -> None:
    """Ops whose channel mapping is not modelled: every dim they touch is a barrier."""
    ctx.block_all(f"{ctx.describe()} has no channel model (einsum, custom kernels); its channels "
                  "are not prunable. Register an op rule to change this.")


register_op_rule("opaque", opaque, functions=(torch.einsum,))
