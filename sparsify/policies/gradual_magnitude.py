"""``gmp``: gradual magnitude pruning (Zhu & Gupta, 2017) of importance vectors.

Every ``update_every`` steps between ``start_step`` and ``end_step`` the target sparsity follows
the cubic schedule; it is split across groups by a budget (uniform, global ranking, or ERK) in
channels, parameters or MACs; each group keeps its largest-importance structures (masks).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from sparsify.policies import budgets
from sparsify.policies.base import GroupView, Mask, Policy, PolicyConfig, register_policy, set_group_masks, top_k_keep


class GMPConfig(PolicyConfig):
    """Gradual magnitude pruning with the cubic schedule and a budget across groups."""

    kind: Literal["gmp"] = "gmp"
    sparsity: float = Field(0.5, gt=0, lt=1, description="final fraction to remove (of `unit`)")
    unit: Literal["channels", "params", "macs"] = Field("channels", description="what `sparsity` counts")
    budget: Literal["uniform", "global", "erk"] = Field("uniform", description="how the target splits across groups")
    start_step: int = Field(0, ge=0, description="first step that updates masks")
    end_step: int = Field(1000, ge=1, description="step at which the final sparsity is reached")
    update_every: int = Field(100, ge=1, description="steps between mask updates (Δt)")
    initial_sparsity: float = Field(0.0, ge=0, lt=1, description="sparsity at start_step")

    @model_validator(mode="after")
    def _check(self) -> GMPConfig:
        if self.end_step <= self.start_step:
            raise ValueError(f"end_step ({self.end_step}) must be after start_step ({self.start_step})")
        if self.initial_sparsity > self.sparsity:
            raise ValueError("initial_sparsity must not exceed sparsity")
        return self


def allocate_keep(groups: Sequence[GroupView], sparsity: float, unit: str, budget: str) -> list[np.ndarray]:
    """Boolean keep vectors per group meeting ``sparsity`` of ``unit`` under ``budget``."""
    magnitudes = [g.magnitude() for g in groups]
    widths = [g.width for g in groups]
    if unit == "channels" and budget == "uniform":
        counts = budgets.keep_counts_uniform(widths, sparsity)
    elif unit == "channels" and budget == "global":
        counts = budgets.keep_counts_global(magnitudes, sparsity)
    else:
        costs = [np.ones(g.width) if unit == "channels" else (g.params if unit == "params" else g.macs)
                 for g in groups]
        shapes = {i: g.shape for i, g in enumerate(groups)}
        counts = budgets.keep_counts_for_cost(magnitudes, costs, sparsity, budget, erk_shapes=shapes)
    return [top_k_keep(m, int(k)) for m, k in zip(magnitudes, counts, strict=True)]


class GMPPolicy(Policy):
    config: GMPConfig

    def attach(self, groups: Sequence[GroupView]) -> None:
        self.groups = list(groups)
        self.current = 0.0
        for g in self.groups:
            for v in g.vectors:
                v.adapter.install(v, Mask(len(v), v.raw().device))

    def target(self, step: int) -> float:
        c = self.config
        return budgets.cubic_sparsity(step, c.sparsity, c.start_step, c.end_step, c.initial_sparsity)

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
        with torch.no_grad():
            for g, keep in zip(self.groups, allocate_keep(self.groups, sparsity, self.config.unit,
                                                          self.config.budget), strict=True):
                set_group_masks(g, keep)

    def finalize(self) -> None:
        if self.current < self.config.sparsity:
            self.update(self.config.sparsity)

    def state_dict(self) -> dict[str, Any]:
        return {"current": self.current,
                "masks": [v.transform.mask.detach().clone() for g in self.groups for v in g.vectors]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.current = state["current"]
        with torch.no_grad():
            vectors = [v for g in self.groups for v in g.vectors]
            for v, m in zip(vectors, state["masks"], strict=True):
                v.transform.mask.copy_(m)


register_policy("gmp", GMPConfig, GMPPolicy)
