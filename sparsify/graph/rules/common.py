"""Coupling helpers shared by op rules."""

from __future__ import annotations

import operator
from typing import Any

import numpy as np
import torch
import torch.fx as fx

from sparsify.graph.builder import OpContext, Space
from sparsify.graph.module_types import sizes_are_synced


def couple_elementwise(ctx: OpContext, x: Any) -> None:
    """Every dim of tensor argument ``x`` is the same dim of the output (right-aligned broadcast)."""
    out, xi = ctx.out_info, ctx.info(x)
    if out is None or xi is None:
        return
    offset = out.ndim - xi.ndim
    for d in range(xi.ndim):
        od = d + offset
        if od >= 0 and xi.shape[d] == out.shape[od]:
            ctx.same(ctx.space(x, d), ctx.out(od))


def couple_dims(ctx: OpContext, x: Any, dims: range | list[int], out_offset: int = 0) -> None:
    """Dim d of ``x`` is dim ``d + out_offset`` of the output, for each d in ``dims``."""
    for d in dims:
        ctx.same(ctx.space(x, d), ctx.out(d + out_offset))


def module_param_members(ctx: OpContext, space: Any, names_roles: list[tuple[str, int, str]]) -> None:
    """Members ``module.<name>`` dim ``dim`` with ``role`` on ``space``, for those that exist."""
    module = ctx.module
    for name, dim, role in names_roles:
        if getattr(module, name, None) is not None:
            ctx.member(space, ctx.module_name, name, dim, role)


# ----- slices of head_dim slots (rotary halves) ----------------------------------------------------
def couple_whole_groups(ctx: OpContext, space: Space | None, channels: int, groups: int) -> None:
    """One structure per group of ``channels // groups`` consecutive channels (GroupNorm's statistics)."""
    if space is not None and groups < channels:
        size = channels // groups
        c = np.arange(channels)
        ctx.pairs(space, space, (c // size) * size, c)


def argument_members(ctx: OpContext, space: Any, args: list[tuple[int, str, str]]) -> None:
    """Per-channel arguments of a norm call (``(position, name, role)``) as members of ``space``.

    An argument computed from other tensors instead of read from a parameter blocks ``space`` and the
    channels it is computed from (timm's ScaledStdConv2d standardises its weight with a computed gain).
    """
    for index, name, role in args:
        arg = ctx.arg(index, name)
        if arg is not None and not ctx.param_member(arg, 0, space, role):
            why = f"{ctx.describe()}: {name} is computed, not a parameter"
            ctx.block(space, why)
            ctx.block(ctx.space(arg, 0), why)


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
    return isinstance(bound, int) and (bound == 0 or sizes_are_synced(node))


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


def _slice_bounds_follow(ctx: OpContext, chain: list[fx.Node]) -> str:
    """"" if every slice on a layout chain has bounds that scale with the width, else why not."""
    for node in chain:
        for dim, bounds in _slices(ctx, node):
            for b in bounds:
                if not _bound_follows(ctx, node, b, dim):
                    return (f"'{node.name}' slices with the bound {b!r}, which does not follow pruning; compute "
                            "it from the tensor's shape (x[..., : x.shape[-1] // 2])")
    return ""


def couple_slice(ctx: OpContext, chain: list[fx.Node], space: Space, head_of: np.ndarray, first: np.ndarray,
                 a: np.ndarray, slots: int) -> str:
    """The exit of the layout ``chain`` (its nodes, first to exit) selects slots ``a`` (each once) of
    ``slots`` head_dim slots (used by ``layout``'s head splits and one-head blocks): if they are a block
    ``[i·n, (i+1)·n)`` with n dividing ``slots`` and the slice bounds follow pruning, couple every
    slot with the slots at the same position of the other blocks (rotary halves: j and j + d/2).
    Returns "" when coupled, else why not."""
    n = len(a)
    if not (np.array_equal(a, np.arange(a[0], a[0] + n)) and slots % n == 0 and a[0] % n == 0):
        return f"it selects head_dim slots {a.tolist()}, not one of {slots // max(n, 1)} equal blocks"
    why = _slice_bounds_follow(ctx, chain)
    if why:
        return why
    position = head_of % n  # a channel's slot position within its block
    ctx.pairs(space, space, first[position], np.arange(len(head_of)))
    return ""
