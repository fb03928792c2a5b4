"""Coupling helpers shared by op rules."""

from __future__ import annotations

from typing import Any

from sparsify.graph.builder import OpContext


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
