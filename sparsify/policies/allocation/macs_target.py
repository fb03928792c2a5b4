"""Hit an exact MACs target with a budget: bisection on the budget's sparsity parameter.

Budgets in ``unit="macs"`` rank structures by their first-order cost (what removing one structure
alone saves). Removing both the inputs and the outputs of a layer saves more than the sum, so the
network ends up cheaper than the nominal sparsity says. ``keeps_for_macs`` finds the sparsity whose
keep vectors give the requested MACs, measured with :class:`MacsModel`, then steps one structure at a
time to it (exact to one structure; with ``round_to``, to one allocation step).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from sparsify.graph.cost import MacsModel
from sparsify.policies.allocation.budgets import Unit
from sparsify.policies.base import GroupView, Policy

_STEPS = 40
_MAX_SPARSITY = 0.999


def keeps_for_macs(groups: Sequence[GroupView], cost_model: MacsModel, fraction_removed: float,
                   allocate: Callable[[float], list[np.ndarray]], refine: bool = True,
                   magnitudes: Sequence[np.ndarray] | None = None) -> list[np.ndarray]:
    """Keep vectors that remove ``fraction_removed`` of the exact MACs: bisection on the sparsity s of
    ``allocate(s)`` (monotone in s), then, with ``refine``, one structure at a time between the last
    allocation short of the target and the first that reaches it (a budget such as ERK moves many
    same-shaped layers at once, so its steps can overshoot the target by several percent)."""
    if not 0 < fraction_removed < 1:
        raise ValueError(f"fraction_removed must be in (0, 1), got {fraction_removed}")
    ids = [g.id for g in groups]

    def removed(keeps: list[np.ndarray]) -> float:
        return 1.0 - cost_model.after(dict(zip(ids, keeps, strict=True))) / cost_model.total

    lo, hi = 0.0, _MAX_SPARSITY
    short, enough = allocate(lo), allocate(hi)
    if removed(enough) < fraction_removed:
        raise ValueError(f"even sparsity {_MAX_SPARSITY} of the budget removes only {removed(enough):.1%} of the "
                         f"MACs, short of {fraction_removed:.1%}: the prunable groups do not carry enough MACs")
    if removed(short) >= fraction_removed:
        return short
    for _ in range(_STEPS):
        mid = 0.5 * (lo + hi)
        keeps = allocate(mid)
        if removed(keeps) >= fraction_removed:
            hi, enough = mid, keeps
        else:
            lo, short = mid, keeps
    if not refine:
        return enough
    magnitudes = [g.magnitude() for g in groups] if magnitudes is None else magnitudes
    return _one_at_a_time(short, enough, magnitudes, removed, fraction_removed)


def _one_at_a_time(short: list[np.ndarray], enough: list[np.ndarray], magnitudes: Sequence[np.ndarray],
                   removed: Callable[[list[np.ndarray]], float], target: float) -> list[np.ndarray]:
    """From ``short``, remove the structures that ``enough`` removes and ``short`` keeps, weakest first and
    spread over the groups (each group's weakest, then each group's second weakest, …), until the
    target is met (bisection on how many)."""
    if any((k & ~s).any() for s, k in zip(short, enough, strict=True)):
        return enough  # not nested: no order between the two
    order = []
    for gi, (magnitude, s, k) in enumerate(zip(magnitudes, short, enough, strict=True)):
        candidates = np.flatnonzero(s & ~k)
        if len(candidates):
            relative = magnitude[candidates] / max(float(magnitude.max()), 1e-30)
            order += [(rank, float(r), gi, int(c)) for rank, (r, c) in
                      enumerate(sorted(zip(relative, candidates, strict=True)))]
    order.sort()

    def without(n: int) -> list[np.ndarray]:
        keeps = [s.copy() for s in short]
        for _, _, gi, c in order[:n]:
            keeps[gi][c] = False
        return keeps

    lo, hi = 0, len(order)  # removed(without(hi)) == removed(enough) ≥ target
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if removed(without(mid)) >= target else (mid, hi)
    return without(hi)


def budget_keeps(policy: Policy, sparsity: float, allocate: Callable[[float], list[np.ndarray]],
                 magnitudes: Sequence[np.ndarray] | None = None, *, unit: Unit,
                 round_to: int | None = None) -> list[np.ndarray]:
    """The policy's keep vectors for ``sparsity`` of ``unit``: with ``unit="macs"`` and a cost model in the
    policy's context (any policy attached by a Sparsifier), ``sparsity`` is the exact fraction of the
    network's MACs removed. ``round_to``: the multiple ``allocate`` rounds widths to (None: it does not)."""
    cost_model = policy.context.cost_model
    if unit == "macs" and cost_model is not None:
        round_to = round_to or 1
        try:  # with round_to > 1, single structures would break the multiples: no one-at-a-time step
            return keeps_for_macs(policy.groups, cost_model, sparsity, allocate, refine=round_to == 1,
                                  magnitudes=magnitudes)
        except ValueError as exc:
            if round_to > 1:
                raise ValueError(f"{exc}; with round_to={round_to} layers narrower than a multiple of it keep "
                                 "their full width: lower round_to or the sparsity") from exc
            raise
    return allocate(sparsity)
