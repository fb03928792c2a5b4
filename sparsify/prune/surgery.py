"""Dependency-aware physical pruning: remove channel structures from every coupled tensor.

All-or-nothing: tensors, module attributes and optimizer state are restored bit-identically if
anything fails part-way.
"""

from __future__ import annotations

import math
import numbers
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from sparsify.errors import InexactPruneError, PruneError
from sparsify.graph.channel_graph import ChannelGraph, ChannelGroup
from sparsify.prune.attributes import modules_to_sync, sync_attributes
from sparsify.prune.fold import BiasFold, check_sinks, plan_folds
from sparsify.prune.guards import check_model_matches, check_no_forward_hooks, check_optimizer
from sparsify.prune.plan_values import check_plan_key, structure_indices


@dataclass
class PruneReport:
    """What ``prune_channels`` did."""

    removed: dict[str, int]  # group name → structures removed
    widths: dict[str, tuple[int, int]]  # group name → (before, after)
    params_before: int
    params_after: int
    folds: list[BiasFold] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    plan: dict[str, list[int]] = field(default_factory=dict)  # group name → removed structure indices (sorted)
    created_biases: dict[str, tuple[int, ...]] = field(default_factory=dict)  # bias folding created → its shape


#: Every PruneReport applied to a live model in this process, in order (sparsify.save checks its reports against it).
PRUNE_HISTORY: weakref.WeakKeyDictionary[nn.Module, list[PruneReport]] = weakref.WeakKeyDictionary()


def _lookup(model: nn.Module, qualified: str) -> tuple[nn.Module, str]:
    module_name, _, attr = qualified.rpartition(".")
    return (model.get_submodule(module_name) if module_name else model), attr


def _validate(cg: ChannelGraph, plan: Mapping[int | str, Sequence[int]], allow_inexact: bool
              ) -> dict[int, tuple[ChannelGroup, np.ndarray]]:
    if not isinstance(cg, ChannelGraph):
        raise PruneError(f"prune_channels takes a ChannelGraph (build_channel_graph(model, example_inputs)), "
                         f"got {type(cg).__name__}")
    if cg.stale:
        raise PruneError("this ChannelGraph was already used to prune its model; its indices are out "
                         "of date. Build a new one with build_channel_graph(model, example_inputs).")
    if not isinstance(plan, Mapping):
        raise PruneError(f"the plan must be a dict {{group id or name: structure indices}}, got "
                         f"{type(plan).__name__}")
    resolved: dict[int, tuple[ChannelGroup, np.ndarray]] = {}
    seen: set[int] = set()
    for key, structures in plan.items():
        try:
            group = cg.group(check_plan_key(key))
        except KeyError:
            raise PruneError(f"the plan names channel group {key!r}, which this graph does not have; its groups "
                             f"are {[g.name for g in cg.groups][:12]} … (ids 0..{len(cg.groups) - 1}; "
                             "`sparsify inspect` lists them)") from None
        if group.id in seen:
            raise PruneError(f"the plan names group '{group.name}' twice (by id and by name); merge the entries")
        seen.add(group.id)
        s = structure_indices(group.name, group.width, structures)
        if len(s) == 0:
            continue
        if not group.prunable:
            raise PruneError(f"group '{group.name}' is not prunable: {group.why_not()}")
        if len(s) == group.width:
            raise PruneError(f"removing all {group.width} structures of group '{group.name}' would "
                             "disconnect the network; keep at least one.")
        if not group.exact and not allow_inexact:
            raise InexactPruneError(
                f"pruning group '{group.name}' changes the network's function even for all-zero "
                f"channels: {group.inexact[0]}. Pass allow_inexact=True to prune it anyway.")
        resolved[group.id] = (group, s)
    return resolved


def _check_verify_atol(verify_atol: Any) -> None:
    if verify_atol is None:
        return
    if (isinstance(verify_atol, bool) or not isinstance(verify_atol, numbers.Real) or not math.isfinite(verify_atol)
            or verify_atol < 0):
        raise PruneError(f"verify_atol must be a finite number ≥ 0 (a tolerance relative to 1 + max |output|, e.g. "
                         f"1e-5) or None to skip the output check, got {verify_atol!r}")


def _reference_outputs(cg: ChannelGraph) -> list[torch.Tensor]:
    """The outputs before surgery on the graph's example inputs; a model that no longer accepts them (moved to
    another device or cast to another dtype since the graph was built) is refused with the fix."""
    try:
        return _eval_outputs(cg)
    except Exception as exc:
        inputs = [t for t in torch.utils._pytree.tree_flatten(cg.traced.inputs)[0] if isinstance(t, torch.Tensor)]
        have = sorted({f"{t.dtype} on {t.device}".replace("torch.", "") for t in inputs})
        now = sorted({f"{t.dtype} on {t.device}".replace("torch.", "") for t in cg.model.parameters()})
        raise PruneError(f"verify_atol runs the model on the example inputs the graph was built with ({', '.join(have)}"
                         f"), and that failed before anything was pruned ({type(exc).__name__}: {exc}). The model's "
                         f"parameters are {', '.join(now)}: if it was moved or cast since the graph was built, rebuild "
                         "the graph with build_channel_graph(model, example_inputs) on the model as it is now") from exc


@torch.inference_mode(False)  # tensors sliced inside the caller's inference_mode would be unusable for training
def prune_channels(
    cg: ChannelGraph,
    plan: Mapping[int | str, Sequence[int]],
    *,
    fold_constants: bool = True,
    allow_inexact: bool = False,
    optimizer: torch.optim.Optimizer | None = None,
    atol: float = 1e-6,
    verify_atol: float | None = None,
) -> PruneReport:
    """Remove the given structures (``{group id or name: structure indices}``) from the model.

    Constants emitted by removed channels are folded into consumers' biases where that is exact;
    elsewhere a non-zero constant raises ``InexactPruneError`` unless ``allow_inexact``. If an
    ``optimizer`` is given, its per-parameter state (momentum, Adam moments) is sliced too. With
    ``verify_atol``, the outputs on the traced example inputs must agree before and after within
    ``verify_atol`` × (1 + max |output|), or everything is rolled back and PruneError is raised.
    """
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise PruneError(f"optimizer must be a torch.optim.Optimizer (whose state is sliced too) or None, got "
                         f"{type(optimizer).__name__}")
    _check_verify_atol(verify_atol)
    resolved = _validate(cg, plan, allow_inexact)
    model = cg.model
    check_model_matches(model, [g for g, _ in resolved.values()])
    if resolved:
        check_no_forward_hooks(model, "prune_channels")
    check_optimizer(model, optimizer, [m.tensor for g, _ in resolved.values() for m in g.members])
    on_meta = any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    if on_meta and verify_atol is not None:
        raise PruneError("verify_atol compares outputs, but the model is on the meta device (no values); "
                         "pass verify_atol=None to prune a meta model's architecture")
    slices: dict[tuple[str, int], set[int]] = {}
    consumers = []
    sinks = []
    for group, s in resolved.values():
        # a meta model has no values: nothing is measured or folded (its architecture is pruned only)
        dead = _dead_structures(model, group, s) if fold_constants and not on_meta else s[:0]
        for space, structure_of, why in group.sinks if len(dead) else ():
            idx = np.flatnonzero(np.isin(structure_of, dead))
            if len(idx):
                sinks.append((space, torch.as_tensor(idx), why))
        for m in group.members:
            idx = m.indices(s)
            if len(idx):
                slices.setdefault((m.tensor, m.dim), set()).update(idx.tolist())
            dead_idx = m.indices(dead)
            if m.role == "in" and len(dead_idx):
                consumers.append((m, torch.as_tensor(dead_idx)))
    for (name, dim), removed in slices.items():
        size = _get(model, name).shape[dim]
        if len(removed) >= size:
            group = next(g.name for g, s in resolved.values() for m in g.members if (m.tensor, m.dim) == (name, dim))
            raise PruneError(f"the plan removes all {size} channels of {name} (dim {dim}, in group '{group}'), "
                             "which would leave that layer empty; keep at least one of its structures.")
    folds = plan_folds(cg, consumers, atol) if fold_constants else []
    folds += check_sinks(cg, sinks, atol)
    inexact = [f for f in folds if not f.exact]
    if inexact and not allow_inexact:
        raise InexactPruneError("removed channels emit constants that cannot be folded exactly: "
                                + "; ".join(f.note for f in inexact[:3])
                                + ". Zero their biases/β too (STR-BN does), or pass allow_inexact=True.")
    params_before = sum(p.numel() for p in model.parameters())
    reference = _reference_outputs(cg) if verify_atol is not None else None
    created_biases: list[str] = []
    with _Transaction(model, optimizer) as tx:
        for fold in folds:
            if fold.delta.numel():
                prefix = f"{fold.module}." if fold.module else ""
                tx.touch_module(fold.module)
                bias = model.get_submodule(fold.module).bias
                created = bias is None
                tx.replace(f"{prefix}bias", fold.delta.clone() if created else bias.detach() + fold.delta)
                if created:
                    created_biases.append(f"{prefix}bias")
                out_dim = 1 if getattr(model.get_submodule(fold.module), "transposed", False) else 0
                if created and (f"{prefix}weight", out_dim) in slices:
                    slices[(f"{prefix}bias", 0)] = slices[(f"{prefix}weight", out_dim)]
        for (name, dim), removed in sorted(slices.items()):
            module, attr = _lookup(model, name)
            tensor = getattr(module, attr)
            dropped = np.zeros(tensor.shape[dim], dtype=bool)
            dropped[np.fromiter(removed, dtype=np.int64)] = True
            keep = np.flatnonzero(~dropped)
            tx.touch_module(name.rpartition(".")[0])
            tx.slice(name, tensor, dim, keep)
        for module_name in modules_to_sync(model, tx.modules):  # attention modules above their projections too
            tx.touch_module(module_name)
            sync_attributes(model.get_submodule(module_name), tx.old_attributes[module_name])
        if reference is not None:
            _check_same(reference, _eval_outputs(cg), verify_atol)
        tx.commit_optimizer()
    cg.stale = True
    report = PruneReport(
        removed={g.name: len(s) for g, s in resolved.values()},
        widths={g.name: (g.width, g.width - len(s)) for g, s in resolved.values()},
        params_before=params_before,
        params_after=sum(p.numel() for p in model.parameters()),
        folds=folds,
        notes=[f.note for f in folds if f.note],
        plan={g.name: s.tolist() for g, s in resolved.values()},
        created_biases={name: tuple(_get(model, name).shape) for name in created_biases},
    )
    PRUNE_HISTORY.setdefault(model, []).append(report)
    return report


def _dead_structures(model: nn.Module, group: ChannelGroup, structures: np.ndarray) -> np.ndarray:
    """The structures that some producing tensor zeroes entirely (a zero γ, a zeroed filter): they
    may carry constants, which are measured and folded. Where every producer is non-zero the
    channels vary with the input; removing them is the caller's (lossy) choice and nothing is
    measured or folded for them."""
    zeroed = np.zeros(group.width, dtype=bool)
    with torch.no_grad():
        for m in group.members:
            if m.role in ("out", "scale", "value"):
                t = _get(model, m.tensor)
                rows = t.detach().movedim(m.dim, 0).reshape(t.shape[m.dim], -1)
                zero_rows = (rows == 0).all(1).cpu().numpy()
                np.logical_or.at(zeroed, m.structure_of, zero_rows)
    return structures[zeroed[structures]]


def _eval_outputs(cg: ChannelGraph) -> list[torch.Tensor]:
    model = cg.model
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            out = model(*cg.traced.inputs)
    finally:
        for m, mode in modes.items():
            m.training = mode
    return [t for t in torch.utils._pytree.tree_flatten(out)[0] if isinstance(t, torch.Tensor)]


def _check_same(reference: list[torch.Tensor], outputs: list[torch.Tensor], atol: float) -> None:
    for a, b in zip(reference, outputs, strict=True):
        if a.shape != b.shape:
            raise PruneError(f"an output changed shape from {tuple(a.shape)} to {tuple(b.shape)}")
        diff = float((a.double() - b.double()).abs().max()) if a.numel() else 0.0
        scale = 1.0 + float(a.double().abs().max()) if a.numel() else 1.0
        if not diff <= atol * scale:
            raise PruneError(f"the pruned model's outputs differ from the soft model's by {diff:.3g} "
                             f"(allowed {atol * scale:.3g}): the removed channels were not all zero")


class _Transaction:
    """Records everything surgery changes and puts it back if the block raises.

    Sliced tensors become new Parameter/tensor objects (a parameter whose shape changes in place
    would confuse autograd graphs still alive from before); the originals are never mutated, so a
    rollback puts them back. The optimizer is only updated by ``commit_optimizer``, last.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
        self.model = model
        self.optimizer = optimizer
        self.originals: dict[str, torch.Tensor | None] = {}  # qualified name → original object
        self.modules: list[str] = []
        self.old_attributes: dict[str, dict[str, Any]] = {}
        self.optimizer_state: dict[int, dict[str, Any]] = {}  # id(original param) → sliced state
        self.aliases: dict[str, list[tuple[str, str]]] = {}  # name → every (module, attr) holding it
        self._holders: dict[int, list[tuple[str, str]]] = {}
        for module_name, module in model.named_modules(remove_duplicate=False):
            for table in (module._parameters, module._buffers):
                for attr, t in table.items():
                    if t is not None and (module_name, attr) not in self._holders.get(id(t), []):
                        self._holders.setdefault(id(t), []).append((module_name, attr))

    def __enter__(self) -> _Transaction:
        return self

    def touch_module(self, name: str) -> None:
        if name in self.old_attributes:
            return
        module = self.model.get_submodule(name)
        self.modules.append(name)
        self.old_attributes[name] = {k: v for k, v in vars(module).items()
                                     if k not in ("_parameters", "_buffers", "_modules")}

    def replace(self, name: str, value: torch.Tensor | None) -> None:
        """Set ``name`` — and every other name the same tensor is registered under (tied weights) —
        to a new tensor (a new Parameter if the old one was a parameter)."""
        module, attr = _lookup(self.model, name)
        old = getattr(module, attr)
        if name not in self.originals:
            self.originals[name] = old
            module_name = name.rpartition(".")[0]
            self.aliases[name] = self._holders.get(id(old), [(module_name, attr)]) if old is not None else [
                (module_name, attr)]
            for holder, _ in self.aliases[name]:
                self.touch_module(holder)
        original = self.originals[name]
        if attr in module._parameters:
            requires_grad = original.requires_grad if original is not None else True
            new = nn.Parameter(value, requires_grad=requires_grad) if value is not None else None
        else:
            new = value
        for holder, holder_attr in self.aliases[name]:
            owner = self.model.get_submodule(holder)
            table = owner._parameters if holder_attr in owner._parameters else owner._buffers
            table[holder_attr] = new

    def slice(self, name: str, tensor: torch.Tensor, dim: int, keep: np.ndarray) -> None:
        index = torch.as_tensor(keep, device=tensor.device)
        grad = None if tensor.grad is None else tensor.grad.index_select(dim, index)
        self.replace(name, tensor.detach().index_select(dim, index))
        new = _get(self.model, name)
        if grad is not None:
            new.grad = grad
        original = self.originals[name]
        if self.optimizer is not None and isinstance(original, nn.Parameter):
            state = self.optimizer_state.get(id(original), self.optimizer.state.get(original))
            if state:
                self.optimizer_state[id(original)] = {
                    k: v.index_select(dim, index.to(v.device))
                    if isinstance(v, torch.Tensor) and v.shape == tensor.shape else v for k, v in state.items()}

    def commit_optimizer(self) -> None:
        """Point the optimizer at the new parameters and their sliced state."""
        if self.optimizer is None:
            return
        swap = {id(old): _get(self.model, name) for name, old in self.originals.items()
                if isinstance(old, nn.Parameter)}
        for group in self.optimizer.param_groups:
            group["params"] = [swap.get(id(p), p) for p in group["params"]]
        for old_id, new in swap.items():
            old = next(o for o in self.originals.values() if id(o) == old_id)
            state = self.optimizer.state.pop(old, None)
            if old_id in self.optimizer_state:
                state = self.optimizer_state[old_id]
            if state is not None:
                self.optimizer.state[new] = state

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            return False
        for name, old in self.originals.items():
            for holder, attr in self.aliases[name]:
                module = self.model.get_submodule(holder)
                table = module._parameters if attr in module._parameters else module._buffers
                table[attr] = old
        for name in self.modules:
            self.model.get_submodule(name).__dict__.update(self.old_attributes[name])
        raise PruneError(f"pruning failed and the model was restored unchanged: {type(exc).__name__}: {exc}") from exc


def _get(model: nn.Module, name: str) -> torch.Tensor:
    module, attr = _lookup(model, name)
    return getattr(module, attr)
