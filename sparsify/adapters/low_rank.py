"""``low_rank``: one importance vector per factorisation, entry r = the weight of rank r.

Two kinds of factorisation are covered:

* :class:`~sparsify.nn.LowRankLinear` / :class:`~sparsify.nn.LowRankConv2d` (W = U·diag(σ)·V, built by
  ``sparsify.nn.factorize_linear``, ``factorize_conv2d`` or ``factorize_``): raw = σ (signed), and the
  transform is installed on σ, so an effective σ_r = 0 removes rank r (row r of V, σ_r, column r of U) exactly.
* Plain factor pairs W = B·A: a group whose only producer is an ``nn.Linear`` A and whose only consumer
  is an ``nn.Linear`` B, with nothing but Identity/Dropout between. raw_r = ‖A[r,:]‖₂·‖B[:,r]‖₂; the
  transform is installed as a factor effective/raw on row r of A (and A's bias r).

The low-rank modules (:mod:`sparsify.nn.low_rank`) are traced through, so the channel graph sees the rank
dimension as one channel group (V rows, σ, U columns).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from torch.nn.utils import parametrize

from sparsify.adapters.base import (
    Adapter,
    AdapterConfig,
    ImportanceVector,
    effective_over_raw,
    original,
    register_adapter,
)
from sparsify.graph.channel_graph import ChannelGraph, ChannelGroup
from sparsify.graph.trace import TensorInfo, TracedModel
from sparsify.nn.low_rank import LowRankConv2d, LowRankLinear

__all__ = ["LowRankConfig"]


class LowRankConfig(AdapterConfig):
    """Importance of a rank = its singular value σ_r (LowRankLinear/LowRankConv2d) or, for a plain
    Linear→Linear pair W = B·A, the product of factor norms ‖A[r,:]‖₂·‖B[:,r]‖₂."""

    kind: Literal["low_rank"] = "low_rank"
    factor_pairs: bool = Field(
        True, description="also cover plain nn.Linear→nn.Linear pairs (only Identity/Dropout between) as "
                          "factorisations W = B·A, with raw_r = ‖A[r,:]‖₂·‖B[:,r]‖₂")


_LOW_RANK = (LowRankLinear, LowRankConv2d)
_PASS_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)
_PASS_FUNCTIONS = (F.dropout, torch.dropout)
_PRODUCING = ("out", "scale", "value", "bias")


class _EffectiveSigma(nn.Module):
    def __init__(self, transform: nn.Module) -> None:
        super().__init__()
        self.transform = transform

    def forward(self, sigma: torch.Tensor) -> torch.Tensor:
        return self.transform(sigma)


class _RowFactor(nn.Module):
    """Multiplies index r of dim 0 by effective_r / raw_r of a factor-pair vector."""

    def __init__(self, vector: ImportanceVector, ndim: int) -> None:
        super().__init__()
        object.__setattr__(self, "vector", vector)  # plain reference: not a submodule
        self.transform = vector.transform
        self.ndim = ndim

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        factor = self.vector.adapter.factor(self.vector)
        return t * factor.to(t.dtype).view(-1, *([1] * (self.ndim - 1)))


class LowRankAdapter(Adapter):
    """Covers rank groups of LowRankLinear/LowRankConv2d (raw = σ) and plain Linear→Linear factor pairs.

    ``bake`` is the base class's: it computes every effective value before removing any parametrization,
    which the pair case needs (the factor on A's bias reads A's weight).
    """

    config: LowRankConfig

    def vectors(self, cg: ChannelGraph) -> list[ImportanceVector]:
        out: list[ImportanceVector] = []
        for group in cg.prunable_groups():
            vector, reason = self._sigma_vector(cg, group)
            if vector is None and not reason and self.config.factor_pairs:
                vector, reason = self._pair_vector(cg, group)
            if vector is None:
                self.skipped[group.name] = reason or "no LowRankLinear/LowRankConv2d σ in the group"
            else:
                out.append(vector)
        return out

    # ----- σ of a low-rank module -----
    def _sigma_vector(self, cg: ChannelGraph, group: ChannelGroup) -> tuple[ImportanceVector | None, str]:
        """(vector, "") if covered; (None, reason) if a σ is present but unusable; (None, "") if none."""
        sigmas = [m for m in group.members if m.tensor == _qual(m.module, "sigma") and m.dim == 0
                  and isinstance(_module(cg.model, m.module), _LOW_RANK)]
        if not sigmas:
            return None, ""
        if len(sigmas) > 1:
            return None, f"several σ share these channels ({', '.join(m.tensor for m in sigmas)})"
        sig = sigmas[0]
        owner = sig.module
        others = [m.tensor for m in group.members if m.role in _PRODUCING and m.module != owner]
        if others:
            return None, f"{sig.tensor}: other tensors also produce these ranks ({', '.join(others[:3])})"
        if len(np.unique(sig.structure_of)) != len(sig.structure_of):
            return None, f"{sig.tensor}: its entries are coupled with each other"
        module = _module(cg.model, owner)
        params = np.full(len(sig.structure_of), float(module.U.numel() // module.U.shape[1] + 1
                                                       + module.V.numel() // module.V.shape[0]))
        macs = _sigma_macs(cg.traced, owner, len(sig.structure_of))
        return ImportanceVector(owner, group, sig.structure_of.copy(), self, handle=module,
                                params_per_entry=params, macs_per_entry=macs), ""

    # ----- plain Linear→Linear pair -----
    def _pair_vector(self, cg: ChannelGraph, group: ChannelGroup) -> tuple[ImportanceVector | None, str]:
        model = cg.model
        outs = [m for m in group.members if m.role == "out"]
        ins = [m for m in group.members if m.role == "in"]
        if len(outs) != 1 or len(ins) != 1:
            return None, (f"not a factor pair: {len(outs)} producing and {len(ins)} consuming layers "
                          "(need one nn.Linear each)")
        a_m, b_m = outs[0], ins[0]
        a, b = _module(model, a_m.module), _module(model, b_m.module)
        if not (isinstance(a, nn.Linear) and isinstance(b, nn.Linear)) or a is b:
            return None, (f"not a factor pair: '{a_m.module}' → '{b_m.module}' are not two distinct nn.Linear "
                          f"({type(a).__name__} → {type(b).__name__})")
        if a_m.tensor != _qual(a_m.module, "weight") or a_m.dim != 0 or b_m.tensor != _qual(b_m.module, "weight") \
                or b_m.dim != 1:
            return None, f"not a factor pair: unexpected members {a_m.tensor} dim {a_m.dim}, {b_m.tensor} dim {b_m.dim}"
        allowed = {(a_m.tensor, 0), (_qual(a_m.module, "bias"), 0), (b_m.tensor, 1)}
        extra = [f"{m.tensor} ({m.role})" for m in group.members if (m.tensor, m.dim) not in allowed]
        if extra:
            return None, f"not a factor pair: the channels also reach {', '.join(extra[:3])}"
        reason = _direct_path(cg.traced.graph_module, a_m.module, b_m.module)
        if reason:
            return None, f"not a factor pair: {reason}"
        if len(np.unique(a_m.structure_of)) != len(a_m.structure_of):
            return None, f"not a factor pair: rows of {a_m.tensor} are coupled with each other"
        params = np.full(len(a_m.structure_of), float(a.in_features + (a.bias is not None) + b.out_features))
        macs = _pair_macs(cg.traced, a_m.module, b_m.module, a, b, len(a_m.structure_of))
        handle = {"a": a, "b": b, "names": (a_m.module, b_m.module)}
        return ImportanceVector(group.name, group, a_m.structure_of.copy(), self, handle=handle,
                                params_per_entry=params, macs_per_entry=macs), ""

    # ----- contract -----
    def raw(self, vector: ImportanceVector) -> torch.Tensor:
        if isinstance(vector.handle, _LOW_RANK):
            return original(vector.handle, "sigma")
        a, b = vector.handle["a"], vector.handle["b"]
        wa, wb = original(a, "weight"), original(b, "weight")
        return wa.norm(dim=1) * wb.norm(dim=0).to(wa.device, wa.dtype)

    def factor(self, vector: ImportanceVector) -> torch.Tensor:
        """Factor pairs: effective / raw per rank (1 without a transform, 0 where raw is 0)."""
        return effective_over_raw(vector)

    def install(self, vector: ImportanceVector, transform: nn.Module) -> None:
        if isinstance(vector.handle, _LOW_RANK):
            if parametrize.is_parametrized(vector.handle, "sigma"):
                raise ValueError(f"'{vector.name}.sigma' already has a parametrization")
            vector.transform = transform
            parametrize.register_parametrization(vector.handle, "sigma", _EffectiveSigma(transform), unsafe=True)
            return
        vector.transform = transform
        for module, name in self.parametrized(vector):
            ndim = getattr(module, name).ndim
            parametrize.register_parametrization(module, name, _RowFactor(vector, ndim), unsafe=True)

    def parametrized(self, vector: ImportanceVector) -> list[tuple[nn.Module, str]]:
        if isinstance(vector.handle, _LOW_RANK):
            return [(vector.handle, "sigma")]
        a = vector.handle["a"]
        return [(a, "weight")] + ([(a, "bias")] if a.bias is not None else [])



# ----- helpers ------------------------------------------------------------------------------------
def _qual(module: str, attr: str) -> str:
    return f"{module}.{attr}" if module else attr


def _module(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name) if name else model
    except AttributeError:
        return None


def _direct_path(gm: fx.GraphModule, a: str, b: str) -> str:
    """"" if the only use of module ``a``'s output is module ``b``, through Identity/Dropout only."""
    calls_a = [n for n in gm.graph.nodes if n.op == "call_module" and str(n.target) == a]
    calls_b = [n for n in gm.graph.nodes if n.op == "call_module" and str(n.target) == b]
    if len(calls_a) != 1 or len(calls_b) != 1:
        return f"'{a}' and '{b}' must each be called once (called {len(calls_a)} and {len(calls_b)} times)"
    node, path = calls_a[0], [a]
    while True:
        users = list(node.users)
        if len(users) != 1:
            return f"the output of {' → '.join(path)} is used by {len(users)} ops"
        user = users[0]
        if user.op == "call_module" and str(user.target) == b and user.args and user.args[0] is node:
            return ""
        passes = (user.op == "call_module" and isinstance(gm.get_submodule(str(user.target)), _PASS_MODULES)) or (
            user.op == "call_function" and user.target in _PASS_FUNCTIONS)
        if not passes or not user.args or user.args[0] is not node:
            what = user.target if user.op == "call_module" else getattr(user.target, "__name__", user.target)
            return (f"{' → '.join(path)} → {what} ({user.op}): only Identity/Dropout may sit between the two "
                    "layers")
        node = user
        path.append(str(user.target) if user.op == "call_module" else user.name)


def _per_example(info: Any) -> int:
    if not isinstance(info, TensorInfo) or not info.shape:
        return 0
    return math.prod(info.shape[1:]) if info.ndim > 1 else info.shape[0]


def _sigma_macs(traced: TracedModel, owner: str, rank: int) -> np.ndarray:
    """MACs per example that each rank of a low-rank module costs (its V and U products)."""
    total = 0.0
    for node in traced.graph.nodes:
        if node.op != "call_function" or node.target not in (F.linear, F.conv2d) or len(node.args) < 2:
            continue
        w = node.args[1]
        if not (isinstance(w, fx.Node) and w.op == "get_attr"):
            continue
        winfo = traced.values.get(w.name)
        if not isinstance(winfo, TensorInfo):
            continue
        macs = _per_example(traced.values.get(node.name)) * math.prod(winfo.shape[1:])
        if str(w.target) == _qual(owner, "V"):
            total += macs / winfo.shape[0]
        elif str(w.target) == _qual(owner, "U"):
            total += macs / winfo.shape[1]
    return np.full(rank, total)


def _pair_macs(traced: TracedModel, a_name: str, b_name: str, a: nn.Linear, b: nn.Linear, rank: int) -> np.ndarray:
    total = 0.0
    for node in traced.graph.nodes:
        if node.op == "call_module" and str(node.target) == a_name:
            total += _per_example(traced.values.get(node.name)) * a.in_features / a.out_features
        elif node.op == "call_module" and str(node.target) == b_name:
            total += _per_example(traced.values.get(node.name))
    return np.full(rank, total)


register_adapter("low_rank", LowRankConfig, LowRankAdapter)
