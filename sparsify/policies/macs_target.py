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
from sparsify.policies import budgets
from sparsify.policies.base import GroupView, Policy

_STEPS = 40
_MAX_SPARSITY = 0.999


def keeps_for_macs(groups: Sequence[GroupView], cost_model: MacsModel, fraction_removed: float,
                   allocate: Callable[[float], list[np.ndarray]]) -> list[np.ndarray]:
    """Keep vectors from ``allocate(s)`` with the smallest s whose exact MACs removed reach
    ``fraction_removed``. ``allocate`` must be monotone in s."""
    if not 0 < fraction_removed < 1:
        raise ValueError(f"fraction_removed must be in (0, 1), got {fraction_removed}")
    ids = [g.vectors[0].group.id for g in groups]

    def removed(keeps: list[np.ndarray]) -> float:
        return 1.0 - cost_model.after(dict(zip(ids, keeps, strict=True))) / cost_model.total

    keeps = budgets.smallest_meeting(allocate, removed, fraction_removed, 0.0, _MAX_SPARSITY, _STEPS)
    if removed(keeps) < fraction_removed:
        raise ValueError(f"even sparsity {_MAX_SPARSITY} of the budget removes only {removed(keeps):.1%} of the "
                         f"MACs, short of {fraction_removed:.1%}: the prunable groups do not carry enough MACs")
    return keeps


def budget_keeps(policy: Policy, sparsity: float, allocate: Callable[[float], list[np.ndarray]]
                 ) -> list[np.ndarray]:
    """The policy's keep vectors for ``sparsity``: with ``unit="macs"`` and a cost model (any policy
    attached by a Sparsifier), ``sparsity`` is the exact fraction of the network's MACs removed."""
    if getattr(policy.config, "unit", None) == "macs" and policy.cost_model is not None:
        try:
            return keeps_for_macs(policy.groups, policy.cost_model, sparsity, allocate)
        except ValueError as exc:
            round_to = getattr(policy.config, "round_to", None)
            if round_to and round_to > 1:
                raise ValueError(f"{exc}; with round_to={round_to} layers narrower than a multiple of it keep "
                                 "their full width: lower round_to or the sparsity") from exc
            raise
    return allocate(sparsity)
