"""``filter_norm``: importance of a structure = Lp norm of the filters that produce it.

One vector per group; the norm of structure s sums ‖W[s]‖_p over the group's producing members
(conv/linear rows, embeddings, additive parameters). A policy's transform is applied as a
per-structure factor effective/norm on every producing tensor (weights, BN γ and β, biases; a
conv/linear feeding a BatchNorm leaves it to the BatchNorm: :mod:`sparsify.adapters.scaled_members`),
so an effective zero removes the structure exactly.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import Field
from torch import nn
from torch.nn.utils import parametrize

from sparsify.adapters.base import (
    Adapter,
    AdapterConfig,
    ImportanceVector,
    StructureFactor,
    original,
    per_forward,
    register_adapter,
)
from sparsify.adapters.scaled_members import scaled_members
from sparsify.graph.channel_graph import ChannelGraph, Member

_NORM_ROLES = ("out", "value")


class FilterNormConfig(AdapterConfig):
    """Importance of a structure = Lp norm of its producing filters, summed over coupled layers."""

    kind: Literal["filter_norm"] = "filter_norm"
    p: Literal[1, 2] = Field(2, description="1 for L1 (Li et al.), 2 for L2 norms")
    include_inexact: bool = Field(False, description="also cover groups whose removal is inexact (a LayerNorm/RMSNorm "
                                  "over the channels: ConvNeXt, LLaMA residual streams); the Sparsifier then needs "
                                  "verify_atol=None and marks them exact=False in its report")


def _tensor(model: nn.Module, member: Member) -> tuple[nn.Module, str]:
    module_name, _, attr = member.tensor.rpartition(".")
    return (model.get_submodule(module_name) if module_name else model), attr


def _index(vector: ImportanceVector, member: Member, device: torch.device) -> torch.Tensor:
    """``member.structure_of`` as a tensor on ``device``, made once (no host copy per forward)."""
    cache = vector.handle.setdefault("index", {})
    key = (member.tensor, member.dim, str(device))
    if key not in cache:
        cache[key] = torch.as_tensor(member.structure_of, device=device)
    return cache[key]


def _is_identity(vector: ImportanceVector, member: Member) -> bool:
    """Whether index i of ``member`` is structure i (a conv's own filters): no scatter needed."""
    cache = vector.handle.setdefault("identity", {})
    key = (member.tensor, member.dim)
    if key not in cache:
        cache[key] = np.array_equal(member.structure_of, np.arange(len(vector)))
    return cache[key]


def structure_norms(vector: ImportanceVector, p: int) -> torch.Tensor:
    """Per structure, the Lp norm of every index of ``vector.handle["norm"]``'s tensors that belongs to it."""
    total = None
    for m in vector.handle["norm"]:
        t = original(*_tensor(vector.handle["model"], m))
        rows = t.movedim(m.dim, 0).reshape(t.shape[m.dim], -1)
        per_index = (rows.square() if p == 2 else rows.abs()).sum(1)  # p=2: no abs (and no sign in the backward)
        if _is_identity(vector, m):
            per_structure = per_index
        else:
            per_structure = torch.zeros(len(vector), dtype=per_index.dtype, device=per_index.device)
            per_structure = per_structure.index_add(0, _index(vector, m, t.device), per_index)
        total = per_structure if total is None else total + per_structure.to(total.device)
    return total.pow(1.0 / p)


class FilterNormAdapter(Adapter):
    """Covers every prunable group that has a producing weight."""

    config: FilterNormConfig

    def vectors(self, cg: ChannelGraph) -> list[ImportanceVector]:
        out = []
        for group in cg.prunable_groups():
            norm_members = [m for m in group.members if m.role in _NORM_ROLES]
            if not norm_members:
                self.skipped[group.name] = "no weight produces these channels"
                continue
            scaled = scaled_members(cg, group)
            handle = {"model": cg.model, "norm": norm_members, "scaled": scaled}
            out.append(ImportanceVector(group.name, group, torch.arange(group.width).numpy(), self, handle=handle))
        return out

    def raw(self, vector: ImportanceVector) -> torch.Tensor:
        return per_forward(vector, "raw", lambda: structure_norms(vector, self.config.p))

    def batched_parametrized_values(self, vectors: list[ImportanceVector], effective: torch.Tensor,
                                    sizes: list[int]) -> list[tuple[nn.Module, str, torch.Tensor]] | None:
        """Every scaled tensor from the policy's batched effective values: one factor chain (effective / raw,
        the raw norms the policy thresholded) for all vectors, then one product per tensor."""
        targets = []
        for v in vectors:
            for module, attr in self.parametrized(v):
                plist = module.parametrizations[attr] if parametrize.is_parametrized(module, attr) else ()
                if len(plist) != 1 or not isinstance(plist[0], StructureFactor) or plist[0].vector is not v:
                    return None  # another parametrization stacked on it: each tensor computes its own
                targets.append((module, attr, plist))
        raw = torch.cat([v.raw() for v in vectors])
        factors = torch.where(raw > 0, effective / raw.clamp_min(torch.finfo(raw.dtype).tiny), torch.zeros_like(raw))
        per_vector = dict(zip((id(v) for v in vectors), factors.split(sizes), strict=True))
        return [(module, attr, plist[0].scale(plist.original, per_vector[id(plist[0].vector)]))
                for module, attr, plist in targets]

    def install(self, vector: ImportanceVector, transform: nn.Module) -> None:
        vector.transform = transform
        for m in vector.handle["scaled"]:
            module, attr = _tensor(vector.handle["model"], m)
            t = getattr(module, attr)
            index = torch.as_tensor(m.structure_of, device=t.device)
            factor = StructureFactor(vector, m.dim, index, t.ndim)
            parametrize.register_parametrization(module, attr, factor, unsafe=True)

    def parametrized(self, vector: ImportanceVector) -> list[tuple[nn.Module, str]]:
        return [_tensor(vector.handle["model"], m) for m in vector.handle["scaled"]]


register_adapter("filter_norm", FilterNormConfig, FilterNormAdapter)
