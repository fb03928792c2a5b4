"""Selection by a tensor of indices: ``aten.index.Tensor`` (``x[idx]``), ``index_select`` and ``topk``.

Which positions an index tensor selects is data (a Mixture-of-Experts router's choice, a token
gather), so the dims it indexes are barriers, with the op named, and so are the index tensor's own
dims (they are the output's selected positions). The dims it does not index keep their channels
position for position, so the channels there stay prunable: a per-expert weight ``w[expert_ids]``
(``w`` of shape (experts, out, in)) keeps the experts' inner neurons as a group while the expert dim
is blocked. The refusal stays local to the indexed dims.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.fx as fx

from sparsify.graph.builder import OpContext
from sparsify.graph.op_rules import register_op_rule

aten = torch.ops.aten


def _overloads(*packets: object) -> tuple[object, ...]:
    return tuple(getattr(p, name) for p in packets for name in p.overloads())


def index_tensor(ctx: OpContext) -> None:
    """``aten.index.Tensor(x, [None, idx, ...])``: the dims read by index tensors are blocked in ``x``
    and in the output (where their broadcast shape stands); every other dim of ``x`` is the same dim of
    the output. A boolean mask (it consumes as many dims as it has) is treated the same way."""
    couple_index(ctx, ctx.node.args[0], list(ctx.node.args[1]))


def tensor_index_of_getitem(ctx: OpContext) -> list[Any] | None:
    """``x[idx]``, ``x[:, idx]``, ``x[..., idx]`` under fx (``operator.getitem``) as an ``aten.index``
    index list (``None`` for a full slice), or None when the subscript holds no tensor or other items
    (an int, a partial slice, a new axis) that the layout rule handles."""
    x, index = ctx.node.args[0], ctx.node.args[1]
    index = index if isinstance(index, tuple) else (index,)
    xi = ctx.info(x)
    if xi is None or not any(isinstance(i, fx.Node) and ctx.info(i) is not None for i in index):
        return None
    if sum(i is Ellipsis for i in index) > 1:
        return None
    entries: list[Any] = []
    for i in index:
        if i is Ellipsis:
            entries += [None] * (xi.ndim - (len(index) - 1))
        elif isinstance(i, slice) and i == slice(None):
            entries.append(None)
        elif isinstance(i, fx.Node) and ctx.info(i) is not None:
            entries.append(i)
        else:
            return None
    return entries


def couple_index(ctx: OpContext, x: Any, indices: list[Any]) -> None:
    """Block the dims of ``x`` read by the index tensors in ``indices`` and where their broadcast shape
    stands in the output; pass every other dim through (``aten.index`` semantics)."""
    xi, out = ctx.info(x), ctx.out_info
    if xi is None or out is None:
        ctx.block_all(f"{ctx.describe()}: index of a value whose shape was not recorded")
        return
    reason = f"{ctx.describe()} selects positions of this dim by a tensor of indices (data, not a channel map)"
    consumed: list[int] = []  # for each index entry, how many dims of x it reads (None: 1, bool mask: its ndim)
    index_ndim = 0
    for idx in indices:
        info = ctx.info(idx) if idx is not None else None
        if idx is not None and info is None:
            ctx.block_all(f"{ctx.describe()}: an index that is not a recorded tensor")
            return
        mask = info is not None and info.dtype in (torch.bool, torch.uint8)
        consumed.append(info.ndim if mask else 1)
        if info is not None:
            index_ndim = max(index_ndim, 1 if mask else info.ndim)
    tensor_entries = [k for k, idx in enumerate(indices) if idx is not None]
    if not tensor_entries:
        for d in range(xi.ndim):
            ctx.same(ctx.space(x, d), ctx.out(d))
        return
    starts = [sum(consumed[:k]) for k in range(len(indices))]
    indexed = {starts[k] + j for k in tensor_entries for j in range(consumed[k])}
    adjacent = tensor_entries == list(range(tensor_entries[0], tensor_entries[-1] + 1))
    first = starts[tensor_entries[0]] if adjacent else 0  # where the index dims stand in the output
    if out.ndim != xi.ndim - len(indexed) + index_ndim:
        ctx.block_all(f"{ctx.describe()}: output rank {out.ndim} does not match the indexing of rank {xi.ndim}")
        return
    for d in sorted(indexed):
        ctx.block(ctx.space(x, d), reason)
    for j in range(index_ndim):
        ctx.block(ctx.out(first + j), reason)
    for k in tensor_entries:
        block_index_dims(ctx, indices[k])
    kept = [d for d in range(xi.ndim) if d not in indexed]
    positions = [d if d < first else d - len(indexed) + index_ndim for d in kept] if adjacent else \
        [index_ndim + k for k in range(len(kept))]
    for d, od in zip(kept, positions, strict=True):
        if xi.shape[d] == out.shape[od]:
            ctx.same(ctx.space(x, d), ctx.out(od))


def block_index_dims(ctx: OpContext, idx: Any) -> None:
    """The dims of an index tensor are the output's selected positions, which are barriers: declared so
    here, or a channel space that reaches the index (a relative-position index buffer through
    ``view(-1)``, Swin's) would stay a prunable group whose removal shrinks the selection unseen."""
    info = ctx.info(idx)
    for d in range(info.ndim if info is not None else 0):
        ctx.block(ctx.space(idx, d), f"{ctx.describe()} reads this dim as positions of an index tensor "
                                     "(which positions it selects is data, not a channel map)")


def index_select(ctx: OpContext) -> None:
    """``index_select(x, dim, idx)``: dim ``dim`` is selected by data (a barrier), the others pass through."""
    x = ctx.node.args[0]
    xi = ctx.info(x)
    if xi is None or ctx.out_info is None:
        return
    dim = int(ctx.value(ctx.arg(1, "dim"))) % xi.ndim
    reason = f"{ctx.describe()} selects positions of dim {dim} by a tensor of indices"
    ctx.block(ctx.space(x, dim), reason)
    ctx.block(ctx.out(dim), reason)
    block_index_dims(ctx, ctx.arg(2, "index"))
    for d in range(xi.ndim):
        if d != dim:
            ctx.same(ctx.space(x, d), ctx.out(d))


def topk(ctx: OpContext) -> None:
    """``topk(x, k, dim)`` (values, indices), also ``sort``: the ranked dim is a barrier (which channels
    come out where depends on the values); every other dim is the same dim of both outputs."""
    x = ctx.node.args[0]
    xi = ctx.info(x)
    outs = ctx.value(ctx.node)
    if xi is None or not isinstance(outs, (tuple, list)):
        ctx.block_all(f"{ctx.describe()}: values and indices were not recorded")
        return
    default = -1
    dim = ctx.value(ctx.arg(2 if ctx.op_name == "topk" else 1, "dim", default))
    dim = int(dim) % xi.ndim
    reason = f"{ctx.describe()} ranks the channels of dim {dim}: which come out where depends on their values"
    ctx.block(ctx.space(x, dim), reason)
    for k in range(len(outs)):
        ctx.block(ctx.out(dim, element=k), reason)
        for d in range(xi.ndim):
            if d != dim:
                ctx.same(ctx.space(x, d), ctx.out(d, element=k))


def repeat_interleave(ctx: OpContext) -> None:
    """``repeat_interleave(x, r, dim)`` with a constant ``r``: output position i of ``dim`` is channel
    i // r of ``x`` (removing a channel removes its r copies); other dims pass through. Repeats given
    as a tensor, no ``dim`` (a flattened result) or a fixed ``output_size`` are barriers."""
    x = ctx.node.args[0]
    xi, out = ctx.info(x), ctx.out_info
    repeats, dim = ctx.value(ctx.arg(1, "repeats")), ctx.value(ctx.arg(2, "dim"))
    if xi is None or out is None or not isinstance(repeats, int) or dim is None \
            or ctx.node.kwargs.get("output_size") is not None:
        ctx.block_all(f"{ctx.describe()}: only a constant number of repeats along a given dim is modelled")
        return
    dim = int(dim) % xi.ndim
    for d in range(xi.ndim):
        if d != dim:
            ctx.same(ctx.space(x, d), ctx.out(d))
    i = np.arange(out.shape[dim])
    ctx.pairs(ctx.space(x, dim), ctx.out(dim), i // repeats, i)


register_op_rule("aten_index_tensor", index_tensor, functions=_overloads(aten.index))
register_op_rule("index_select", index_select, functions=(torch.index_select, *_overloads(aten.index_select)),
                 methods=("index_select",))
register_op_rule("topk", topk, functions=(torch.topk, torch.sort, *_overloads(aten.topk, aten.sort)),
                 methods=("topk", "sort"))
register_op_rule("repeat_interleave", repeat_interleave,
                 functions=(torch.repeat_interleave, *_overloads(aten.repeat_interleave)),
                 methods=("repeat_interleave",))
