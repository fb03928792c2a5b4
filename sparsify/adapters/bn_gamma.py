"""``bn_gamma``: one importance vector per BatchNorm, its γ; learnable form is STR-BN.

The BN is rewritten as Y = γ_eff·(x̂ + β̂) with β̂ = β/γ stored in place of β, so the effective
bias γ_eff·β̂ vanishes with γ_eff and a zeroed channel emits exactly zero (no constant to fold).
A group is covered only if every producer of its channels is followed by one of its BNs.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn
from torch.nn.utils import parametrize

from sparsify.adapters.base import Adapter, AdapterConfig, ImportanceVector, original, register_adapter
from sparsify.graph.channel_graph import ChannelGraph, ChannelGroup

_BN = nn.modules.batchnorm._BatchNorm


class BNGammaConfig(AdapterConfig):
    """Importance of a channel = its BatchNorm γ (STR-BN when combined with the ``str`` policy)."""

    kind: Literal["bn_gamma"] = "bn_gamma"
    reparametrize_bias: bool = Field(
        True, description="store β̂ = β/γ and compute the bias as γ_eff·β̂ (STR-BN), so zeroed channels emit 0")
    min_gamma: float = Field(1e-6, gt=0, description="|γ| below this gives β̂ = 0 when converting β to β̂")


class _EffectiveGamma(nn.Module):
    def __init__(self, transform: nn.Module) -> None:
        super().__init__()
        self.transform = transform

    def forward(self, gamma: torch.Tensor) -> torch.Tensor:
        return self.transform(gamma)


class _GammaTimesBetaHat(nn.Module):
    def __init__(self, bn: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "bn", bn)

    def forward(self, beta_hat: torch.Tensor) -> torch.Tensor:
        return self.bn.weight * beta_hat


class BNGammaAdapter(Adapter):
    """Covers groups whose every producing layer feeds one of the group's BatchNorms."""

    config: BNGammaConfig

    def vectors(self, cg: ChannelGraph) -> list[ImportanceVector]:
        out: list[ImportanceVector] = []
        for group in cg.prunable_groups():
            bns = [m for m in group.members if m.role == "scale" and m.tensor == f"{m.module}.weight"
                   and isinstance(cg.model.get_submodule(m.module), _BN)]
            reason = _uncovered(cg, group, {m.module for m in bns})
            if reason:
                self.skipped[group.name] = reason
                continue
            for m in bns:
                bn = cg.model.get_submodule(m.module)
                out.append(ImportanceVector(m.module, group, m.structure_of, self, handle=bn))
        return out

    def raw(self, vector: ImportanceVector) -> torch.Tensor:
        return original(vector.handle, "weight")

    def install(self, vector: ImportanceVector, transform: nn.Module) -> None:
        bn = vector.handle
        if parametrize.is_parametrized(bn, "weight"):
            raise ValueError(f"BatchNorm '{vector.name}' already has a parametrization on its weight")
        vector.transform = transform
        if self.config.reparametrize_bias and bn.bias is not None:
            with torch.no_grad():
                gamma = bn.weight
                safe = gamma.abs() >= self.config.min_gamma
                bn.bias.copy_(torch.where(safe, bn.bias / torch.where(safe, gamma, torch.ones_like(gamma)),
                                          torch.zeros_like(gamma)))
        parametrize.register_parametrization(bn, "weight", _EffectiveGamma(transform), unsafe=True)
        if self.config.reparametrize_bias and bn.bias is not None:
            parametrize.register_parametrization(bn, "bias", _GammaTimesBetaHat(bn), unsafe=True)

    def parametrized_values(self, vector: ImportanceVector, effective: torch.Tensor
                            ) -> list[tuple[nn.Module, str, torch.Tensor]] | None:
        bn = vector.handle
        out = [(bn, "weight", effective)]
        if parametrize.is_parametrized(bn, "bias"):
            out.append((bn, "bias", effective * original(bn, "bias")))
        return out

    def batched_parametrized_values(self, vectors: list[ImportanceVector], effective: torch.Tensor,
                                    sizes: list[int]) -> list[tuple[nn.Module, str, torch.Tensor]] | None:
        bns = [v.handle for v in vectors]
        if not all(parametrize.is_parametrized(bn, "bias") for bn in bns):
            return super().batched_parametrized_values(vectors, effective, sizes)
        bias = effective * torch.cat([original(bn, "bias") for bn in bns])  # γ_eff·β̂ for every BN at once
        out = []
        for bn, w, b in zip(bns, effective.split(sizes), bias.split(sizes), strict=True):
            out += [(bn, "weight", w), (bn, "bias", b)]
        return out

    def parametrized(self, vector: ImportanceVector) -> list[tuple[nn.Module, str]]:
        return [(vector.handle, "weight"), (vector.handle, "bias")]


def _uncovered(cg: ChannelGraph, group: ChannelGroup, bn_modules: set[str]) -> str:
    if not bn_modules:
        return "no BatchNorm in the group"
    gm = cg.traced.graph_module
    calls = {str(n.target): n for n in gm.graph.nodes if n.op == "call_module"}
    for m in group.members:
        if m.role == "value":
            return f"{m.tensor} adds to these channels directly, not through a BatchNorm"
        if m.role != "out":
            continue
        node = calls.get(m.module)
        users = list(node.users) if node is not None else []
        if not users or any(u.op != "call_module" or str(u.target) not in bn_modules for u in users):
            return f"'{m.module}' produces these channels without a BatchNorm of the group after it"
    return ""


register_adapter("bn_gamma", BNGammaConfig, BNGammaAdapter)
