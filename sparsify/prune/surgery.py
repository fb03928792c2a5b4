"""Dependency-aware physical pruning: remove channel structures from every coupled tensor.

All-or-nothing: tensors, module attributes and optimizer state are restored bit-identically if
anything fails part-way.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from sparsify.errors import InexactPruneError, PruneError
from sparsify.graph.channel_graph import ChannelGraph, ChannelGroup
from sparsify.prune.attributes import sync_attributes
from sparsify.prune.fold import BiasFold, apply_fold, plan_folds


@dataclass
class PruneReport:
    """What ``prune_channels`` did."""

    removed: dict[str, int]  # group name → structures removed
    widths: dict[str, tuple[int, int]]  # group name → (before, after)
    params_before: int
    params_after: int
    folds: list[BiasFold] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _lookup(model: nn.Module, qualified: str) -> tuple[nn.Module, str]:
    module_name, _, attr = qualified.rpartition(".")
    return (model.get_submodule(module_name) if module_name else model), attr


def _validate(cg: ChannelGraph, plan: Mapping[int | str, Sequence[int]], allow_inexact: bool
              ) -> dict[int, tuple[ChannelGroup, np.ndarray]]:
    if cg.stale:
        raise PruneError("this ChannelGraph was already used to prune its model; its indices are out "
                         "of date. Build a new one with build_channel_graph(model, example_inputs).")
    resolved: dict[int, tuple[ChannelGroup, np.ndarray]] = {}
    for key, structures in plan.items():
        group = cg.group(key)
        s = np.unique(np.asarray(list(structures), dtype=np.int64))
        if len(s) == 0:
            continue
        if not group.prunable:
            raise PruneError(f"group '{group.name}' is not prunable: {group.why_not()}")
        if s.min() < 0 or s.max() >= group.width:
            raise PruneError(f"group '{group.name}' has {group.width} structures; got indices outside "
                             f"[0, {group.width}): {s[(s < 0) | (s >= group.width)][:5].tolist()}")
        if len(s) == group.width:
            raise PruneError(f"removing all {group.width} structures of group '{group.name}' would "
                             "disconnect the network; keep at least one.")
        if not group.exact and not allow_inexact:
            raise InexactPruneError(
                f"pruning group '{group.name}' changes the network's function even for all-zero "
                f"channels: {group.inexact[0]}. Pass allow_inexact=True to prune it anyway.")
        resolved[group.id] = (group, s)
    return resolved


def prune_channels(
    cg: ChannelGraph,
    plan: Mapping[int | str, Sequence[int]],
    *,
    fold_constants: bool = True,
    allow_inexact: bool = False,
    optimizer: torch.optim.Optimizer | None = None,
    atol: float = 1e-6,
) -> PruneReport:
    """Remove the given structures (``{group id or name: structure indices}``) from the model.

    Constants emitted by removed channels are folded into consumers' biases where that is exact;
    elsewhere a non-zero constant raises ``InexactPruneError`` unless ``allow_inexact``. If an
    ``optimizer`` is given, its per-parameter state (momentum, Adam moments) is sliced too.
    """
    resolved = _validate(cg, plan, allow_inexact)
    model = cg.model
    slices: dict[tuple[str, int], set[int]] = {}
    consumers = []
    for group, s in resolved.values():
        for m in group.members:
            idx = m.indices(s)
            if len(idx):
                slices.setdefault((m.tensor, m.dim), set()).update(idx.tolist())
                if m.role == "in" and fold_constants:
                    consumers.append((m, torch.as_tensor(idx)))
    folds = plan_folds(cg, consumers, atol) if fold_constants else []
    inexact = [f for f in folds if not f.exact]
    if inexact and not allow_inexact:
        raise InexactPruneError("removed channels emit constants that cannot be folded exactly: "
                                + "; ".join(f.note for f in inexact[:3])
                                + ". Zero their biases/β too (STR-BN does), or pass allow_inexact=True.")
    params_before = sum(p.numel() for p in model.parameters())
    with _Transaction(model, optimizer) as tx:
        for fold in folds:
            if fold.delta.numel():
                prefix = f"{fold.module}." if fold.module else ""
                tx.touch_module(fold.module)
                tx.touch_tensor(f"{prefix}bias")
                created = model.get_submodule(fold.module).bias is None
                apply_fold(model, fold)
                out_dim = 1 if getattr(model.get_submodule(fold.module), "transposed", False) else 0
                if created and (f"{prefix}weight", out_dim) in slices:
                    slices[(f"{prefix}bias", 0)] = slices[(f"{prefix}weight", out_dim)]
        for (name, dim), removed in sorted(slices.items()):
            module, attr = _lookup(model, name)
            tensor = getattr(module, attr)
            keep = np.setdiff1d(np.arange(tensor.shape[dim]), np.fromiter(removed, dtype=np.int64))
            tx.touch_module(name.rpartition(".")[0])
            tx.slice(name, tensor, dim, keep)
        for module_name in tx.modules:
            sync_attributes(model.get_submodule(module_name), tx.old_attributes[module_name])
    cg.stale = True
    return PruneReport(
        removed={g.name: len(s) for g, s in resolved.values()},
        widths={g.name: (g.width, g.width - len(s)) for g, s in resolved.values()},
        params_before=params_before,
        params_after=sum(p.numel() for p in model.parameters()),
        folds=folds,
        notes=[f.note for f in folds if f.note],
    )


class _Transaction:
    """Records everything surgery changes and puts it back if the block raises."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
        self.model = model
        self.optimizer = optimizer
        self.tensors: dict[str, tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]] = {}
        self.modules: list[str] = []
        self.old_attributes: dict[str, dict[str, Any]] = {}
        self.optimizer_state: dict[int, dict[str, Any]] = {}
        self.new_bias: list[str] = []

    def __enter__(self) -> _Transaction:
        return self

    def touch_module(self, name: str) -> None:
        if name in self.old_attributes:
            return
        module = self.model.get_submodule(name)
        self.modules.append(name)
        self.old_attributes[name] = {k: v for k, v in vars(module).items()
                                     if k not in ("_parameters", "_buffers", "_modules")}
        self.old_attributes[name]["__bias_param__"] = module._parameters.get("bias", "absent")

    def touch_tensor(self, name: str) -> None:
        if name in self.tensors:
            return
        module, attr = _lookup(self.model, name)
        t = getattr(module, attr)
        if t is not None:
            self.tensors[name] = (t, t.data, t.grad)

    def slice(self, name: str, tensor: torch.Tensor, dim: int, keep: np.ndarray) -> None:
        self.touch_tensor(name)
        index = torch.as_tensor(keep, device=tensor.device)
        if self.optimizer is not None and isinstance(tensor, nn.Parameter):
            state = self.optimizer.state.get(tensor)
            if state:
                self.optimizer_state.setdefault(id(tensor), (tensor, dict(state)))
                for k, v in state.items():
                    if isinstance(v, torch.Tensor) and v.shape == tensor.shape:
                        state[k] = v.index_select(dim, index.to(v.device))
        grad = None if tensor.grad is None else tensor.grad.index_select(dim, index)
        tensor.grad = None
        tensor.data = tensor.data.index_select(dim, index)
        tensor.grad = grad

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            return False
        for t, data, grad in self.tensors.values():
            t.grad = None
            t.data = data
            t.grad = grad
        for name in self.modules:
            module = self.model.get_submodule(name)
            old = dict(self.old_attributes[name])
            bias = old.pop("__bias_param__")
            module.__dict__.update(old)
            if bias == "absent":
                module._parameters.pop("bias", None)
            else:
                module._parameters["bias"] = bias
        if self.optimizer is not None:
            for tensor, state in self.optimizer_state.values():
                self.optimizer.state[tensor] = state
        raise PruneError(f"pruning failed and the model was restored unchanged: {type(exc).__name__}: {exc}") from exc
