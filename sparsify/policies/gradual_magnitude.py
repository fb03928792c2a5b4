"""``gmp``: gradual magnitude pruning (Zhu & Gupta, 2017) of importance vectors.

Every ``update_every`` steps between ``start_step`` and ``end_step`` the target sparsity follows
the cubic schedule; it is split across groups by a budget (uniform, global ranking, or ERK) in
channels, parameters or MACs; each group keeps its largest-importance structures (masks). With
``SparsifierConfig.round_to`` (read from the policy context) the masks keep rounded widths while training.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from sparsify.errors import SparsifyError
from sparsify.policies.allocation import budgets
from sparsify.policies.allocation.budgets import Budget, Unit
from sparsify.policies.allocation.latency_budget import allocate_by_latency
from sparsify.policies.allocation.latency_target import LatencyTargetReport, pruned_copy, solve_latency_target
from sparsify.policies.allocation.macs_target import budget_keeps
from sparsify.policies.base import (
    GroupView,
    Mask,
    Policy,
    PolicyConfig,
    PolicyContext,
    register_policy,
    set_group_masks,
    top_k_keep,
)
from sparsify.prune.select import round_keep

_ROUND_BISECT_STEPS = 30


class GMPConfig(PolicyConfig):
    """Gradual magnitude pruning with the cubic schedule and a budget across groups."""

    kind: Literal["gmp"] = "gmp"
    sparsity: float = Field(0.5, gt=0, lt=1, description="final fraction to remove (of `unit`)")
    unit: Unit = Field(
        "channels", description="what `sparsity` counts; macs: the exact fraction of the network's MACs removed "
                                "(second order, solved by bisection on the budget)")
    budget: Budget = Field(
        "uniform", description="how the target splits across groups; latency: where removing channels saves the most "
                               "estimated time (sparsify.policies.allocation.latency_budget; needs unit='macs' and "
                               "Sparsifier(..., latency_model=...))")
    latency_importance_weight: float = Field(
        1.0, ge=0, description="budget='latency': how much a chunk's magnitude counts against the time it saves "
                               "(0: pure latency)")
    max_group_sparsity: float = Field(
        1.0, gt=0, le=1, description="largest fraction of one group's structures the budget may remove (e.g. 0.5 "
                                     "keeps at least half the heads of every layer); budget='latency' only for now")
    target_speedup: float | None = Field(
        None, description="budget='latency': the measured speedup over the dense network to reach (e.g. 2.0); the "
                          "MACs fraction is then solved by measuring pruned copies, and `sparsity` is not used")
    target_ms: float | None = Field(
        None, gt=0, description="budget='latency': the measured latency in ms to reach (instead of target_speedup)")
    latency_tolerance: float = Field(
        0.05, gt=0, lt=1, description="a latency target is met when the measured ms is within this fraction of it")
    latency_max_iterations: int = Field(
        8, ge=1, description="pruned networks measured at most per solve of a latency target")
    start_step: int = Field(0, ge=0, description="first step that updates masks")
    end_step: int = Field(1000, ge=1, description="step at which the final sparsity is reached")
    update_every: int = Field(100, ge=1, description="steps between mask updates (Δt)")
    initial_sparsity: float = Field(0.0, ge=0, lt=1, description="sparsity at start_step")

    @model_validator(mode="before")
    @classmethod
    def _moved(cls, data: Any) -> Any:
        if isinstance(data, dict) and "round_to" in data:
            raise ValueError("round_to is set on the Sparsifier, not the policy: SparsifierConfig(adapter=..., "
                             "policy=GMPConfig(...), round_to=8) (the gmp masks then keep rounded widths while "
                             "training)")
        return data

    @model_validator(mode="after")
    def _check(self) -> GMPConfig:
        if self.end_step <= self.start_step:
            raise ValueError(f"end_step ({self.end_step}) must be after start_step ({self.start_step})")
        if self.initial_sparsity > self.sparsity:
            raise ValueError("initial_sparsity must not exceed sparsity")
        if self.budget == "latency" and self.unit != "macs":
            raise ValueError(f"budget='latency' needs unit='macs' (sparsity is the exact fraction of MACs removed), "
                             f"got unit={self.unit!r}")
        self._check_latency_target()
        if self.max_group_sparsity < 1 and self.budget != "latency":
            raise ValueError(f"max_group_sparsity={self.max_group_sparsity} is only honoured by budget='latency' "
                             f"(got budget={self.budget!r}); use budget='latency' (with unit='macs') or leave "
                             "max_group_sparsity at 1.0")
        return self


    def _check_latency_target(self) -> None:
        if self.target_speedup is None and self.target_ms is None:
            return
        if self.target_speedup is not None and self.target_ms is not None:
            raise SparsifyError(f"GMPConfig got both target_speedup={self.target_speedup} and target_ms="
                                f"{self.target_ms}: they contradict each other; give one of them")
        if self.budget != "latency":
            raise SparsifyError(f"a latency target (target_speedup / target_ms) needs budget='latency' (with "
                                f"unit='macs'), got budget={self.budget!r}")
        if self.target_speedup is not None and not (math.isfinite(self.target_speedup) and self.target_speedup > 1):
            raise SparsifyError(f"target_speedup must be > 1 (2.0: twice as fast as the dense network), got "
                                f"{self.target_speedup}; to keep the dense speed, prune nothing")

    @property
    def latency_target(self) -> bool:
        """Whether the final sparsity is solved for a measured latency target."""
        return self.target_speedup is not None or self.target_ms is not None


def allocate_keep(groups: Sequence[GroupView], sparsity: float, unit: Unit, budget: Budget,
                  round_to: int | None = None, meet_target: bool = True,
                  magnitudes: list[np.ndarray] | None = None) -> list[np.ndarray]:
    """Boolean keep vectors per group meeting ``sparsity`` of ``unit`` under ``budget``.

    With ``round_to``, every layer keeps a multiple of ``round_to`` channels (or its full width), and (if
    ``meet_target``) the sparsity handed to the budget is raised (bisection) until the rounded vectors
    remove at least the cost the unrounded ones would. Pass ``meet_target=False`` when a caller bisects
    on an exact target itself (the MACs controller): the result is then just rounded, and monotone in
    ``sparsity``. ``magnitudes`` (per group, as ``GroupView.magnitude()``) saves recomputing them."""
    magnitudes = [g.magnitude() for g in groups] if magnitudes is None else magnitudes
    keeps = _allocate(groups, magnitudes, sparsity, unit, budget)
    if round_to is None or round_to == 1:
        return keeps
    if not meet_target:
        return [round_keep(g.group, k, round_to, m) for g, k, m in zip(groups, keeps, magnitudes,
                                                                                  strict=True)]
    costs = _costs(groups, unit)

    def removed(ks: list[np.ndarray]) -> float:
        return float(sum(c[~k].sum() for c, k in zip(costs, ks, strict=True)))

    def rounded(s: float) -> list[np.ndarray]:
        return [round_keep(g.group, k, round_to, m)
                for g, k, m in zip(groups, _allocate(groups, magnitudes, s, unit, budget), magnitudes, strict=True)]

    target = removed(keeps) * (1 - 1e-12)
    return budgets.smallest_meeting(rounded, removed, target, sparsity, 1.0, _ROUND_BISECT_STEPS)


def _costs(groups: Sequence[GroupView], unit: Unit) -> list[np.ndarray]:
    """What removing each structure of each group saves, in ``unit``."""
    return [np.ones(g.width) if unit == "channels" else (g.params if unit == "params" else g.macs) for g in groups]


def magnitude_keeps(policy: Policy, sparsity: float, unit: Unit, budget: Budget, round_to: int | None = None,
                    magnitudes: list[np.ndarray] | None = None) -> list[np.ndarray]:
    """Keep vectors for ``policy.groups``: the largest structures by magnitude, ``sparsity`` of ``unit``
    removed under ``budget`` (the exact MACs fraction where the policy has a cost model), kept widths
    multiples of ``round_to``."""
    groups = policy.groups
    magnitudes = [g.magnitude() for g in groups] if magnitudes is None else magnitudes  # once, not per bisection
    exact = unit == "macs" and policy.context.cost_model is not None  # budget_keeps bisects on the exact MACs
    return budget_keeps(policy, sparsity, lambda s: allocate_keep(groups, s, unit, budget, round_to,
                                                                  meet_target=not exact, magnitudes=magnitudes),
                        magnitudes=magnitudes, unit=unit, round_to=round_to)


def set_masks(groups: Sequence[GroupView], keeps: Sequence[np.ndarray]) -> None:
    """Write one keep vector per group into its Mask transforms."""
    with torch.no_grad():
        for g, keep in zip(groups, keeps, strict=True):
            set_group_masks(g, keep)


def _allocate(groups: Sequence[GroupView], magnitudes: list[np.ndarray], sparsity: float, unit: Unit,
              budget: Budget) -> list[np.ndarray]:
    widths = [g.width for g in groups]
    if unit == "channels" and budget == "uniform":
        counts = budgets.keep_counts_uniform(widths, sparsity)
    elif unit == "channels" and budget == "global":
        counts = budgets.keep_counts_global(magnitudes, sparsity)
    else:
        costs = _costs(groups, unit)
        shapes = {i: g.shape for i, g in enumerate(groups)}
        counts = budgets.keep_counts_for_cost(magnitudes, costs, sparsity, budget, erk_shapes=shapes)
    return [top_k_keep(m, int(k)) for m, k in zip(magnitudes, counts, strict=True)]


class GMPPolicy(Policy):
    config: GMPConfig

    def attach(self, groups: Sequence[GroupView], context: PolicyContext) -> None:
        if self.config.budget == "latency" and (context.latency_model is None or context.cost_model is None):
            raise SparsifyError("GMPConfig(budget='latency') needs a latency model: pass Sparsifier(model, inputs, "
                                "..., latency_model=lambda graph: sparsify.measure.LatencyModel(graph, batch=..., "
                                "device=..., step=...)) (or a LatencyModel built on the same model)")
        if self.config.latency_target and not any(
                hasattr(x, "shape") for x in context.latency_model.graph.traced.inputs):  # type: ignore[union-attr]
            raise SparsifyError("a latency target measures the pruned network on the example inputs, but the "
                                "traced inputs hold no tensor: pass Sparsifier(model, example_inputs=...) with the "
                                "tensors the model runs on")
        self.groups, self.context = list(groups), context
        self.current = 0.0
        self.final: float | None = None if self.config.latency_target else self.config.sparsity
        self.latency_report: LatencyTargetReport | None = None  # a latency target's last solve
        for g in self.groups:
            for v in g.vectors:
                v.adapter.install(v, Mask(len(v), v.raw().device))

    def target(self, step: int) -> float:
        c = self.config
        final = self._final_sparsity()
        return budgets.cubic_sparsity(step, final, c.start_step, c.end_step, min(c.initial_sparsity, final))

    def step(self, step: int) -> None:
        c = self.config
        if step < c.start_step or ((step - c.start_step) % c.update_every and step != c.end_step):
            return
        if step > c.end_step + c.update_every:
            return
        self.update(self.target(step))

    def update(self, sparsity: float) -> None:
        """Recompute every mask for ``sparsity`` (masked structures have raw magnitude kept, so they
        may come back if they grow: only the effective value is zeroed)."""
        self.current = sparsity
        if sparsity <= 0:
            return
        c = self.config
        if c.budget == "latency":
            keeps = self._latency_keeps(sparsity, [g.magnitude() for g in self.groups])
        else:
            keeps = magnitude_keeps(self, sparsity, c.unit, c.budget, self.context.round_to)
        set_masks(self.groups, keeps)

    def _latency_keeps(self, sparsity: float, mags: list[np.ndarray]) -> list[np.ndarray]:
        context = self.context
        assert context.latency_model is not None and context.cost_model is not None  # attach checks
        return allocate_by_latency(self.groups, mags, context.latency_model, context.cost_model, sparsity,
                                   context.round_to or 1,
                                   importance_weight=self.config.latency_importance_weight,
                                   max_group_sparsity=self.config.max_group_sparsity)

    def finalize(self) -> None:
        if self.config.latency_target:  # solved again on the final magnitudes, from the last solution
            final = self._solve(start=self.final)
            if final <= 0:
                set_masks(self.groups, [np.ones(g.width, dtype=bool) for g in self.groups])
                self.current = 0.0
            else:
                self.update(final)
            return
        if self.current < self.config.sparsity:
            self.update(self.config.sparsity)

    # ----- latency targets
    def _final_sparsity(self) -> float:
        if self.final is None:
            self.final = self._solve()
        return self.final

    def _solve(self, start: float | None = None) -> float:
        """Solve the MACs fraction for the latency target on the current magnitudes (0: dense); sets
        ``latency_report``."""
        c, lat = self.config, self.context.latency_model
        assert lat is not None  # attach checks
        mags = [g.magnitude() for g in self.groups]
        by_id = {g.id: m for g, m in zip(self.groups, mags, strict=True)}

        def keeps_for(f: float) -> dict[int, np.ndarray]:
            return {g.id: k for g, k in zip(self.groups, self._latency_keeps(f, mags), strict=True)}

        def measure(keep: dict[int, np.ndarray] | None) -> float:
            return lat.network_ms(pruned_copy(lat.graph, keep or {}, by_id.__getitem__, self.context.round_to))

        _, self.latency_report = solve_latency_target(
            keeps_for, lat.after, measure, c.target_ms, target_speedup=c.target_speedup,
            tolerance=c.latency_tolerance, max_iterations=c.latency_max_iterations, start=start)
        self.final = self.latency_report.fraction
        if not self.latency_report.met:
            warnings.warn(f"gmp: latency target not met: {self.latency_report.reason} (the report: "
                          "policy.latency_report, PruneResult.latency)", stacklevel=2)
        return self.final

    def state_dict(self) -> dict[str, Any]:
        return {"current": self.current, "final": self.final,
                "masks": [v.transform.mask.detach().clone() for g in self.groups for v in g.vectors]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.current = state["current"]
        self.final = state.get("final", self.final)
        with torch.no_grad():
            vectors = [v for g in self.groups for v in g.vectors]
            for v, m in zip(vectors, state["masks"], strict=True):
                v.transform.mask.copy_(m)


register_policy("gmp", GMPConfig, GMPPolicy)
