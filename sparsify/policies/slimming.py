"""``slimming``: Network Slimming (Liu et al., 2017) as a baseline.

During training an L1 penalty λ·sign(γ) is added to the gradient of each raw importance parameter
(BN γ); at ``prune()`` one global threshold removes the target fraction of channels (or of
parameters / MACs). Standard BNs still emit β after γ is masked; sparsify's bn_gamma adapter
stores β̂ = β/γ so the masked channel emits exactly zero (the original folds nothing and is
slightly inexact).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from pydantic import Field

from sparsify.policies.allocation.budgets import Unit
from sparsify.policies.base import (
    GroupView,
    Mask,
    Policy,
    PolicyConfig,
    PolicyContext,
    register_policy,
)
from sparsify.policies.gradual_magnitude import magnitude_keeps, set_masks


class SlimmingConfig(PolicyConfig):
    """L1 on BN γ during training, one global threshold at the end."""

    kind: Literal["slimming"] = "slimming"
    l1: float = Field(1e-4, ge=0, description="λ of the L1 penalty on γ (the paper uses 1e-4 / 1e-5)")
    sparsity: float = Field(0.5, gt=0, lt=1, description="fraction to remove at prune()")
    unit: Unit = Field(
        "channels", description="what `sparsity` counts; macs: the exact fraction of the network's MACs removed "
                                "(second order, solved by bisection on the budget)")
    budget: Literal["global", "uniform", "erk"] = Field("global", description="global threshold as in the paper")


class SlimmingPolicy(Policy):
    config: SlimmingConfig

    def attach(self, groups: Sequence[GroupView], context: PolicyContext) -> None:
        self.groups, self.context = list(groups), context
        self.hooks = []
        for g in self.groups:
            for v in g.vectors:
                raw = v.raw()
                if not (isinstance(raw, torch.nn.Parameter) and raw.is_leaf):
                    raise ValueError(f"slimming needs an adapter whose raw vector is a parameter (e.g. bn_gamma); "
                                     f"'{v.name}' from {v.adapter.kind!r} is computed")
                v.adapter.install(v, Mask(len(v), raw.device))
                if self.config.l1:
                    lam = self.config.l1
                    self.hooks.append(raw.register_hook(
                        lambda grad, p=raw, lam=lam: grad + lam * torch.sign(p.detach())))

    def finalize(self) -> None:
        c = self.config
        set_masks(self.groups, magnitude_keeps(self, c.sparsity, c.unit, c.budget))

    def state_dict(self) -> dict[str, Any]:
        return {}


register_policy("slimming", SlimmingConfig, SlimmingPolicy)
