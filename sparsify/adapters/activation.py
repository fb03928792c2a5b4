"""``activation``: Wanda-style importance, |W| weighted by the activations that the weights see.

Wanda (Sun et al., 2023) scores a weight W[i, j] by |W[i, j]|·‖X_j‖, where ‖X_j‖ is the norm of
input channel j over calibration data. For a structure s of a channel group the score sums over
the layers that consume it (its ``in`` members): Σ_layers Σ_i |W[i, s]|·‖X_s‖. Calibration keeps
one running Σx² per consumed input channel (forward pre-hooks on the consuming Linear/Conv
layers, no activations kept), so memory is bounded by one forward pass whatever the number of
batches. Prune one-shot with the ``gmp`` policy (``update`` to the final sparsity, then
``prune()``) or with :func:`sparsify.oneshot.apply_plan`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from sparsify.adapters.base import ImportanceVector, effective_over_raw, original, register_adapter
from sparsify.adapters.filter_norm import FilterNormAdapter, FilterNormConfig, _index
from sparsify.adapters.scaled_members import scaled_members
from sparsify.errors import SparsifyError
from sparsify.graph.channel_graph import ChannelGraph, Member
from sparsify.graph.trace import as_args


class ActivationConfig(FilterNormConfig):
    """Importance of a structure = Σ over consuming layers of |W[:, s]|·‖X_s‖ on calibration data (Wanda)."""

    kind: Literal["activation"] = "activation"  # type: ignore[assignment]
    p: Literal[1, 2] = Field(1, description="norm of the consuming weight columns: 1 is Wanda's Σ|W|, 2 uses ‖W‖₂")
    include_inexact: bool = Field(False, description="also cover groups whose removal is inexact (a norm over the "
                                  "channels, e.g. a transformer's hidden width); prune() refuses those")


def _consumer(model: nn.Module, member: Member) -> nn.Module | None:
    """The Linear/Conv whose input channels ``member`` indexes, or None if it is not such a layer."""
    module = model.get_submodule(member.module) if member.module else model
    if member.tensor != (f"{member.module}.weight" if member.module else "weight") or member.dim != 1:
        return None
    if isinstance(module, nn.Linear):
        return module
    if isinstance(module, nn.modules.conv._ConvNd) and module.groups == 1 and not module.transposed:
        return module
    return None


class ActivationStats:
    """Running Σx² per input channel of chosen Linear/Conv layers, accumulated by forward pre-hooks."""

    def __init__(self) -> None:
        self.sumsq: dict[str, torch.Tensor] = {}  # module name → float64 vector over its input channels
        self.samples = 0  # batches seen
        self.version = 0

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.sumsq.values())

    def collect(self, model: nn.Module, modules: Iterable[str], batches: Iterable[Any]) -> None:
        """Run ``model`` on every batch (eval mode, no_grad) and accumulate the layers' input Σx²."""
        hooks = {name: self._hook(name, model.get_submodule(name) if name else model)
                 for name in dict.fromkeys(modules)}
        self.samples += calibration_pass(model, hooks, batches)
        self.version += 1

    def _hook(self, name: str, module: nn.Module):
        conv = isinstance(module, nn.modules.conv._ConvNd)

        def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            x = (args[0] if args else kwargs["input"]).detach()
            x = x.movedim(1, -1) if conv else x
            sq = x.reshape(-1, x.shape[-1]).float().pow(2).sum(0).double()
            prev = self.sumsq.get(name)
            self.sumsq[name] = sq if prev is None else prev.add_(sq.to(prev.device))

        return hook

    def norm(self, name: str) -> torch.Tensor | None:
        t = self.sumsq.get(name)
        return None if t is None else t.sqrt()


def calibration_pass(model: nn.Module, hooks: dict[str, Callable[..., None]], batches: Iterable[Any]) -> int:
    """Run ``model`` on every batch in eval mode without gradients, with each ``hooks[name]`` as a forward
    pre-hook (``with_kwargs``) of submodule ``name`` (``""``: the model); hooks and train/eval modes are
    restored whatever happens. Returns the number of batches run."""
    handles = [(model.get_submodule(name) if name else model).register_forward_pre_hook(hook, with_kwargs=True)
               for name, hook in hooks.items()]
    modes = {m: m.training for m in model.modules()}
    count = 0
    try:
        model.eval()
        with torch.no_grad():
            for batch in batches:
                args, kwargs = as_args(batch)
                model(*args, **kwargs)
                count += 1
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
    return count


class ActivationAdapter(FilterNormAdapter):
    """Covers every prunable group that a Linear/Conv (groups=1) consumes; one vector per group.

    With the Sparsifier it calibrates on the example inputs when it can; call
    ``sp.adapter.calibrate(model, batches)`` for a real calibration set (before the policy's update).
    """

    config: ActivationConfig

    def __init__(self, config: ActivationConfig) -> None:
        super().__init__(config)
        self.stats = ActivationStats()
        self._vectors: list[ImportanceVector] = []

    def vectors(self, cg: ChannelGraph, *, calibrate: bool = True) -> list[ImportanceVector]:
        out = []
        for group in cg.prunable_groups():
            if not group.exact and not self.config.include_inexact:
                self.skipped[group.name] = f"inexact ({group.inexact[0]}); set include_inexact=True to cover it"
                continue
            consumers = [m for m in group.members if m.role == "in" and _consumer(cg.model, m) is not None]
            if not consumers:
                self.skipped[group.name] = "no Linear/Conv (groups=1) consumes these channels, so Wanda has no X"
                continue
            scaled = scaled_members(cg, group)
            handle = {"model": cg.model, "in": consumers, "scaled": scaled, "cache": None}
            out.append(ImportanceVector(group.name, group, torch.arange(group.width).numpy(), self, handle=handle))
        self._vectors = out
        if calibrate and out and not any(t.is_meta for t in cg.model.parameters()):
            try:  # the example inputs, positionally (works for fx-traced models and input_ids-only HF models)
                self.calibrate(cg.model, [tuple(cg.traced.inputs)])
            except Exception as exc:  # the user calibrates explicitly instead
                warnings.warn(f"activation adapter: could not calibrate on the example inputs ({type(exc).__name__}: "
                              f"{exc}); call adapter.calibrate(model, batches) before pruning", stacklevel=2)
        return out

    @property
    def calibrated(self) -> bool:
        return self.stats.samples > 0

    def calibrate(self, model: nn.Module, batches: Iterable[Any], *, vectors: list[ImportanceVector] | None = None,
                  reset: bool = True, graph: ChannelGraph | None = None) -> ActivationStats:
        """Accumulate ‖X‖² of the consuming layers' inputs over ``batches`` (each in the form of
        ``example_inputs``: a tensor, a tuple or a dict). ``reset`` discards earlier statistics."""
        vectors = self._vectors if vectors is None else vectors
        if any(t.is_meta for t in model.parameters()):
            raise SparsifyError("cannot calibrate a model on the meta device (it has no weights); calibrate the "
                                "real model, or plan on the meta model with sparsify.oneshot.make_plan")
        if reset:
            self.stats = ActivationStats()
        self.stats.collect(model, [m.module for v in vectors for m in v.handle["in"]], batches)
        if self.stats.samples == 0:
            raise SparsifyError("calibrate() got no batches; pass an iterable of example inputs")
        return self.stats

    def raw(self, vector: ImportanceVector) -> torch.Tensor:
        model = vector.handle["model"]
        weights = [original(model.get_submodule(m.module), "weight") for m in vector.handle["in"]]
        key = (self.stats.version, id(self.stats), *((id(w), w._version) for w in weights))
        cache = vector.handle["cache"]
        if cache is not None and cache[0] == key:
            return cache[1]
        total = None
        for m, w in zip(vector.handle["in"], weights, strict=True):
            col = w.detach().movedim(1, 0).flatten(1).abs().pow(self.config.p).sum(1).pow(1.0 / self.config.p)
            norm = self.stats.norm(m.module)
            if norm is not None:
                col = col * norm.to(col.device, col.dtype)
            per_structure = torch.zeros(len(vector), dtype=col.dtype, device=col.device)
            per_structure = per_structure.index_add(0, _index(vector, m, col.device), col)
            total = per_structure if total is None else total + per_structure.to(total.device)
        vector.handle["cache"] = (key, total)
        return total

    def factor(self, vector: ImportanceVector) -> torch.Tensor:
        """The mask itself for mask policies (a structure never seen active still stays unless masked)."""
        mask = getattr(vector.transform, "mask", None)
        return mask if isinstance(mask, torch.Tensor) else effective_over_raw(vector)


register_adapter("activation", ActivationConfig, ActivationAdapter)
