"""``str``: Soft Threshold Reparameterization (Kusupati et al., 2020) on importance vectors.

Effective value sign(v)·relu(|v| − g(s)) with g = sigmoid and a learnable threshold parameter s
per vector (per layer, as in STR) or shared by a group. Weight decay on s (the optimizer's, plus an
optional ``threshold_decay``) raises the threshold over training; the loss pushes back, so layer
budgets are learned. ``s_init`` sets how long training stays effectively dense.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from sparsify.policies.base import GroupView, Policy, PolicyConfig, register_policy


class STRConfig(PolicyConfig):
    """Learned soft thresholds on importance vectors (STR; with bn_gamma this is STR-BN)."""

    kind: Literal["str"] = "str"
    s_init: float = Field(-5.0, description="initial threshold parameter; sigmoid(s_init) is the initial threshold")
    threshold_decay: float = Field(
        0.0, ge=0, description="extra L2 decay on s, added to its gradient (on top of the optimizer's weight decay)")
    granularity: Literal["vector", "group"] = Field(
        "vector", description="one threshold per vector (per BN layer, as STR-BN) or one shared by a channel group")


class SoftThreshold(nn.Module):
    """sign(v)·relu(|v| − sigmoid(s)) with a learnable scalar s."""

    def __init__(self, s_init: float, device: torch.device | None = None) -> None:
        super().__init__()
        self.s = nn.Parameter(torch.full((1,), float(s_init), device=device))

    @property
    def threshold(self) -> torch.Tensor:
        return torch.sigmoid(self.s)

    def forward(self, raw: torch.Tensor) -> torch.Tensor:
        return torch.sign(raw) * torch.relu(raw.abs() - torch.sigmoid(self.s).to(raw.dtype))


class STRPolicy(Policy):
    config: STRConfig

    def attach(self, groups: Sequence[GroupView]) -> None:
        self.groups = list(groups)
        self.transforms: list[SoftThreshold] = []
        for group in self.groups:
            shared = None
            for v in group.vectors:
                device = v.raw().device
                if self.config.granularity == "group" and shared is not None:
                    t = shared
                else:
                    t = SoftThreshold(self.config.s_init, device)
                    self.transforms.append(t)
                    if self.config.threshold_decay:
                        decay = self.config.threshold_decay
                        t.s.register_hook(lambda g, s=t.s, decay=decay: g + decay * s.detach())
                    shared = t
                v.adapter.install(v, t)

    def thresholds(self) -> dict[str, float]:
        """Current threshold g(s) per vector."""
        return {v.name: float(v.transform.threshold.detach()) for g in self.groups for v in g.vectors}

    def state_dict(self) -> dict[str, Any]:
        return {"s": [t.s.detach().clone() for t in self.transforms]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            for t, s in zip(self.transforms, state["s"], strict=True):
                t.s.copy_(s)


register_policy("str", STRConfig, STRPolicy)
