"""Hit an exact MACs target with a budget: bisection on the budget's sparsity parameter.

Budgets in ``unit="macs"`` rank structures by their first-order cost (what removing one structure
alone saves). Removing both the inputs and the outputs of a layer saves more than the sum, so the
network ends up cheaper than the nominal sparsity says. ``keeps_for_macs`` finds the sparsity whose
keep vectors give exactly (to one structure) the requested MACs, measured with :class:`MacsModel`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from sparsify.graph.cost import MacsModel
from sparsify.policies.base import GroupView, Policy

_STEPS = 40


def keeps_for_macs(groups: Sequence[GroupView], cost_model: MacsModel, fraction_removed: float,
                   allocate: Callable[[float], list[np.ndarray]]) -> tuple[list[np.ndarray], float]:
    """Keep vectors from ``allocate(s)`` with the smallest s whose exact MACs removed reach
    ``fraction_removed``; returns them and s. ``allocate`` must be monotone in s."""
    if not 0 < fraction_removed < 1:
        raise ValueError(f"fraction_removed must be in (0, 1), got {fraction_removed}")
    ids = [g.vectors[0].group.id for g in groups]

    def removed(keeps: list[np.ndarray]) -> float:
        return 1.0 - cost_model.after(dict(zip(ids, keeps, strict=True))) / cost_model.total

    lo, hi = 0.0, 0.999
    best = allocate(hi)
    if removed(best) < fraction_removed:
        raise ValueError(f"even sparsity {hi} of the budget removes only {removed(best):.1%} of the MACs, "
                         f"short of {fraction_removed:.1%}: the prunable groups do not carry enough MACs")
    for _ in range(_STEPS):
        mid = 0.5 * (lo + hi)
        keeps = allocate(mid)
        if removed(keeps) >= fraction_removed:
            hi, best = mid, keeps
        else:
            lo = mid
    return best, hi


def budget_keeps(policy: Policy, sparsity: float, allocate: Callable[[float], list[np.ndarray]]
                 ) -> list[np.ndarray]:
    """The policy's keep vectors for ``sparsity``: with ``unit="macs"`` and a cost model (any policy
    attached by a Sparsifier), ``sparsity`` is the exact fraction of the network's MACs removed."""
    if getattr(policy.config, "unit", None) == "macs" and policy.cost_model is not None:
        try:
            return keeps_for_macs(policy.groups, policy.cost_model, sparsity, allocate)[0]
        except ValueError as exc:
            round_to = getattr(policy.config, "round_to", None)
            if round_to and round_to > 1:
                raise ValueError(f"{exc}; with round_to={round_to} layers narrower than a multiple of it keep "
                                 "their full width: lower round_to or the sparsity") from exc
            raise
    return allocate(sparsity)
