"""``fluctuation``: FLAP's fluctuation importance (An et al., 2024), with bias compensation.

A structure whose input channels of a consuming Linear vary little over the data can be replaced by
its mean: FLAP scores input channel j of a consumer by Var(X_j)·‖W[:, j]‖² (the energy that
replacing X_j by its mean costs the layer's output) and sums over the channels of a structure
(the head_dim channels of a head, all heads of a KV group) and over the layers that consume it.
Calibration keeps a running mean and variance per consumed channel (Chan's parallel update, float64,
no activations kept). FLAP ranks across layers after standardising each layer's scores,
z = (S − mean(S)) / std(S); with ``standardize=True`` (the default) ``raw()`` is softplus(z), positive
and in the same order as z, so a ``global`` budget ranks structures of different layers as FLAP does.

**Bias compensation.** FLAP adds W[:, removed] · mean(X_removed) to the consumer's bias, so the layer
still emits the removed channels' mean contribution. This is exact *in expectation* over the
calibration distribution, not for each input: it is never part of the exactness oracle. It is two
steps around the surgery: ``comp = adapter.compensation(removal)`` before (reads the columns that are
about to go), ``comp.apply()`` after; :func:`sparsify.oneshot.apply_plan` does both with
``compensate=True``. Consumers without a bias (LLaMA's ``o_proj`` and ``down_proj``) are left out and
listed in ``comp.skipped`` unless ``comp.apply(add_bias=True)``, which registers a new bias
parameter: a plain PyTorch model keeps it, but a Hugging Face model reloaded with ``from_pretrained``
drops it unless its config declares those biases (LLaMA: ``attention_bias`` / ``mlp_bias``).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field
from torch import nn

from sparsify.adapters.activation import ActivationAdapter, calibration_pass
from sparsify.adapters.base import AdapterConfig, ImportanceVector, original, register_adapter
from sparsify.adapters.filter_norm import _index
from sparsify.adapters.scaled_members import scaled_members
from sparsify.errors import SparsifyError
from sparsify.graph.channel_graph import ChannelGraph, Member


class FluctuationConfig(AdapterConfig):
    """Importance of a structure = Σ over consuming Linear layers of Var(X_s)·‖W[:, s]‖² (FLAP)."""

    kind: Literal["fluctuation"] = "fluctuation"
    standardize: bool = Field(True, description="FLAP's per-layer standardisation of the scores (softplus of the "
                              "z-score), so that structures of different layers compare in a global budget")
    include_inexact: bool = Field(False, description="also cover groups whose removal is inexact; prune() refuses "
                                  "those")


class FluctuationStats:
    """Running mean and M2 (Σ (x − mean)²) per input channel of chosen Linear layers, in float64."""

    def __init__(self) -> None:
        self.count: dict[str, int] = {}
        self.mean: dict[str, torch.Tensor] = {}
        self.m2: dict[str, torch.Tensor] = {}
        self.samples = 0
        self.version = 0

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for d in (self.mean, self.m2) for t in d.values())

    def collect(self, model: nn.Module, modules: Iterable[str], batches: Iterable[Any]) -> None:
        self.samples += calibration_pass(model, {n: self._hook(n) for n in dict.fromkeys(modules)}, batches)
        self.version += 1

    def _hook(self, name: str):
        def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            x = (args[0] if args else kwargs["input"]).detach()
            x = x.reshape(-1, x.shape[-1]).double()
            n_b, mean_b = x.shape[0], x.mean(0)
            m2_b = (x - mean_b).pow(2).sum(0)
            n_a = self.count.get(name, 0)
            if n_a == 0:
                self.count[name], self.mean[name], self.m2[name] = n_b, mean_b, m2_b
                return
            mean_a, n = self.mean[name], n_a + n_b
            delta = mean_b.to(mean_a.device) - mean_a
            self.mean[name] = mean_a + delta * (n_b / n)
            self.m2[name] = self.m2[name] + m2_b.to(mean_a.device) + delta.pow(2) * (n_a * n_b / n)
            self.count[name] = n

        return hook

    def var(self, name: str) -> torch.Tensor | None:
        """Sample variance (n − 1 in the denominator, as FLAP) per input channel."""
        if name not in self.m2:
            return None
        return self.m2[name] / max(self.count[name] - 1, 1)


@dataclass
class Compensation:
    """Per consumer Linear, the bias change W[:, removed]·mean(X_removed), computed before the surgery."""

    model: nn.Module
    deltas: dict[str, torch.Tensor] = field(default_factory=dict)  # module name → delta over its outputs
    skipped: dict[str, str] = field(default_factory=dict)  # module name → why no bias was changed
    applied: list[str] = field(default_factory=list)

    def apply(self, add_bias: bool = False) -> Compensation:
        """Add the deltas to the consumers' biases (after the surgery: the output widths do not change).
        ``add_bias`` registers a bias where a consumer has none (see the module docstring)."""
        if self.applied:
            raise SparsifyError("this compensation was applied already; compute a new one for another prune")
        for name, delta in self.deltas.items():
            module = self.model.get_submodule(name)
            if module.bias is None:
                if not add_bias:
                    self.skipped[name] = "has no bias; apply(add_bias=True) adds one (see FluctuationAdapter docs)"
                    continue
                module.bias = nn.Parameter(delta.to(module.weight.dtype).clone(),
                                           requires_grad=module.weight.requires_grad)
            else:
                with torch.no_grad():
                    original(module, "bias").add_(delta.to(module.bias.device, module.bias.dtype))
            self.applied.append(name)
        return self


def _linear_consumer(model: nn.Module, member: Member) -> bool:
    module = model.get_submodule(member.module) if member.module else None
    return (isinstance(module, nn.Linear) and member.dim == 1
            and member.tensor == (f"{member.module}.weight" if member.module else "weight"))


class FluctuationAdapter(ActivationAdapter):
    """Covers every prunable group that a Linear consumes; one vector per group (calibrated like ``activation``)."""

    config: FluctuationConfig  # type: ignore[assignment]

    def __init__(self, config: FluctuationConfig) -> None:  # type: ignore[override]
        super().__init__(config)  # type: ignore[arg-type]
        self.stats = FluctuationStats()  # type: ignore[assignment]

    def vectors(self, cg: ChannelGraph, *, calibrate: bool = True) -> list[ImportanceVector]:
        out = []
        for group in cg.prunable_groups():
            if not group.exact and not self.config.include_inexact:
                self.skipped[group.name] = f"inexact ({group.inexact[0]}); set include_inexact=True to cover it"
                continue
            consumers = [m for m in group.members if m.role == "in" and _linear_consumer(cg.model, m)]
            if not consumers:
                self.skipped[group.name] = "no Linear consumes these channels, so there is no input variance"
                continue
            scaled = scaled_members(cg, group)
            handle = {"model": cg.model, "in": consumers, "scaled": scaled, "cache": None}
            out.append(ImportanceVector(group.name, group, torch.arange(group.width).numpy(), self, handle=handle))
        self._vectors = out
        if calibrate and out and not any(t.is_meta for t in cg.model.parameters()):
            try:
                self.calibrate(cg.model, [tuple(cg.traced.inputs)])
            except Exception as exc:
                warnings.warn(f"fluctuation adapter: could not calibrate on the example inputs ({type(exc).__name__}: "
                              f"{exc}); call adapter.calibrate(model, batches) before pruning", stacklevel=2)
        return out

    def calibrate(self, model: nn.Module, batches: Iterable[Any], *, vectors: list[ImportanceVector] | None = None,
                  reset: bool = True, graph: ChannelGraph | None = None) -> FluctuationStats:  # type: ignore[override]
        """Accumulate the mean and variance of the consuming layers' inputs over ``batches``."""
        vectors = self._vectors if vectors is None else vectors
        if any(t.is_meta for t in model.parameters()):
            raise SparsifyError("cannot calibrate a model on the meta device (it has no weights); calibrate the "
                                "real model, or plan on the meta model with sparsify.oneshot.make_plan")
        if reset:
            self.stats = FluctuationStats()  # type: ignore[assignment]
        self.stats.collect(model, [m.module for v in vectors for m in v.handle["in"]], batches)
        if self.stats.samples == 0:
            raise SparsifyError("calibrate() got no batches; pass an iterable of example inputs")
        return self.stats  # type: ignore[return-value]

    def fluctuation(self, vector: ImportanceVector) -> torch.Tensor:
        """Per structure, Σ over its consumers' channels of Var(X_j)·‖W[:, j]‖² (before standardisation)."""
        if not self.calibrated:
            raise SparsifyError(f"fluctuation: group '{vector.name}' is not calibrated; call "
                                "adapter.calibrate(model, batches) first")
        model = vector.handle["model"]
        total = None
        for m in vector.handle["in"]:
            w = original(model.get_submodule(m.module), "weight").detach()
            var = self.stats.var(m.module)
            col = w.double().pow(2).sum(0) * (var.to(w.device) if var is not None else 0.0)
            per_structure = torch.zeros(len(vector), dtype=col.dtype, device=col.device)
            per_structure = per_structure.index_add(0, _index(vector, m, col.device), col)
            total = per_structure if total is None else total + per_structure.to(total.device)
        return total

    def raw(self, vector: ImportanceVector) -> torch.Tensor:
        model = vector.handle["model"]
        weights = [original(model.get_submodule(m.module), "weight") for m in vector.handle["in"]]
        key = (self.stats.version, id(self.stats), *((id(w), w._version) for w in weights))
        cache = vector.handle["cache"]
        if cache is not None and cache[0] == key:
            return cache[1]
        score = self.fluctuation(vector)
        if self.config.standardize:
            std = score.std() if len(score) > 1 else score.new_zeros(())
            z = (score - score.mean()) / std if bool(std > 0) else torch.zeros_like(score)
            score = nn.functional.softplus(z)
        vector.handle["cache"] = (key, score)
        return score

    def compensation(self, removal: Mapping[int, Iterable[int]]) -> Compensation:
        """The bias changes for removing ``removal`` ({group id: structures}, a removal plan or
        ``Sparsifier.zero_structures()``); call before the surgery, ``.apply()`` after it."""
        if not self.calibrated:
            raise SparsifyError("fluctuation: compensation needs the calibration means; call "
                                "adapter.calibrate(model, batches) first")
        by_group = {v.group.id: v for v in self._vectors}
        out = Compensation(self._vectors[0].handle["model"] if self._vectors else nn.Module())
        for gid, structures in removal.items():
            structures = np.asarray(list(structures), dtype=np.int64)
            vector = by_group.get(gid)
            if vector is None or not len(structures):
                continue
            for m in vector.handle["in"]:
                idx = torch.as_tensor(m.indices(structures), dtype=torch.long)
                w = original(out.model.get_submodule(m.module), "weight").detach()
                mean = self.stats.mean[m.module].to(w.device)
                delta = w.double().index_select(1, idx.to(w.device)) @ mean.index_select(0, idx.to(w.device))
                prev = out.deltas.get(m.module)
                out.deltas[m.module] = delta if prev is None else prev + delta
        return out


register_adapter("fluctuation", FluctuationConfig, FluctuationAdapter)
