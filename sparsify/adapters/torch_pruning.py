"""``torch_pruning``: Torch-Pruning's importance criteria as importance vectors over sparsify's groups.

For each channel group, every producing Conv/Linear is handed to Torch-Pruning (TP) as the root of
a pruning group (``DependencyGraph.get_pruning_group``); TP's criterion scores the root's channels
over the layers TP couples with it, and the scores are mapped to the group's structures
(``Member.structure_of``; several channels of one structure are summed, or averaged with
``structure_reduction="mean"``). A group is covered only when TP couples exactly the layers and
channels that sparsify does; otherwise it is left out with the reason in ``adapter.skipped``
(never guessed): no Conv/Linear produces it, TP's graph does not reach it, TP couples other layers
or channels, or its structures are heads / RNN units (TP scores single channels).

Criteria: ``magnitude`` (group Lp norm), ``lamp`` (Lee et al., 2021), ``bn_scale`` (|γ|, Network
Slimming), ``taylor`` (|w·∂L/∂w|, Molchanov et al., 2019) and ``hessian`` (w²·E[(∂L/∂w)²], Optimal
Brain Damage with the empirical Fisher). TP's ``normalizer`` (default: divide by the mean) rescales
each TP group on its own, which matters only for budgets that rank across groups (``global``).

When scores are read:

- ``magnitude``, ``lamp``, ``bn_scale``: on every ``raw()`` from the current weights (recomputed when
  a weight changed), like ``filter_norm``.
- ``taylor``, ``hessian``: ``raw()`` returns the scores of the last ``adapter.refresh()``; the first
  ``raw()`` refreshes by itself. ``refresh()`` reads the gradients present *now*: run
  ``loss.backward()`` before creating the Sparsifier (or calling ``apply_plan``), and during training
  call ``sp.adapter.refresh()`` after ``backward()`` and before ``optimizer.zero_grad()`` on the
  steps where the policy updates its masks. ``hessian`` uses the mean of the squared per-sample
  gradients accumulated with ``adapter.accumulate_grad(model)`` since the last refresh (one
  ``backward`` per sample, as in TP), or, if none were accumulated, the current gradients squared
  (the batch counted as one sample). The model's own ``.grad`` are left as they were.

The scores are computed, not learned: only mask policies accept this adapter (``gmp``; one-shot with
:func:`sparsify.oneshot.apply_plan`). ``str`` and ``slimming`` need a learnable raw vector and are
refused. Masks act as in ``filter_norm``: a per-structure factor on every producing tensor, so an
effective zero removes the structure exactly. Torch-Pruning is imported only when the adapter is
created (``pip install torch-pruning``).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import Field, model_validator
from torch import nn
from torch.nn.utils import parametrize

from sparsify._utils import is_meta
from sparsify.adapters.base import AdapterConfig, ImportanceVector, original, register_adapter
from sparsify.adapters.filter_norm import FilterNormAdapter
from sparsify.adapters.scaled_members import scaled_members
from sparsify.errors import SparsifyError
from sparsify.graph.channel_graph import ChannelGraph, ChannelGroup, Member

Criterion = Literal["magnitude", "taylor", "hessian", "lamp", "bn_scale"]
_GRADIENT_CRITERIA = ("taylor", "hessian")
_ROOTS = (nn.modules.conv._ConvNd, nn.Linear)  # where TP roots a pruning group (its default root types)
_SCORED = (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)
_OUT_ROLES = ("out", "scale", "bias", "value", "stat")  # member roles that index a layer's output channels


class TorchPruningConfig(AdapterConfig):
    """Importance of a structure = a Torch-Pruning criterion on the TP group of its producing layer."""

    kind: Literal["torch_pruning"] = "torch_pruning"
    criterion: Criterion = Field("magnitude", description="Torch-Pruning importance: magnitude "
                                 "(GroupMagnitudeImportance), taylor (GroupTaylorImportance), hessian "
                                 "(GroupHessianImportance), lamp (LAMPImportance), bn_scale (BNScaleImportance)")
    p: Literal[1, 2] = Field(2, description="norm degree of magnitude and lamp")
    group_reduction: Literal["mean", "sum", "max", "prod", "first"] = Field(
        "mean", description="how TP combines the scores of the coupled layers of a group")
    normalizer: Literal["default", "mean", "max", "sum", "standarization"] | None = Field(
        "default", description="TP's per-group normalisation of the scores (its spelling); default: 'mean', or "
                               "LAMP's own for lamp; None: raw scores")
    bias: bool = Field(False, description="also score biases (magnitude, lamp, taylor, hessian)")
    multivariable: bool = Field(False, description="taylor: |Σ w·∂L/∂w| per channel instead of Σ |w·∂L/∂w|")
    structure_reduction: Literal["sum", "mean"] = Field(
        "sum", description="how the channel scores of one structure (e.g. a grouped-conv block) combine")

    @model_validator(mode="after")
    def _check(self) -> TorchPruningConfig:
        readers = {"p": ("magnitude", "lamp"), "bias": ("magnitude", "lamp", "taylor", "hessian"),
                   "multivariable": ("taylor",)}
        for name, criteria in readers.items():
            if getattr(self, name) != type(self).model_fields[name].default and self.criterion not in criteria:
                raise ValueError(f"{name} is read by criterion {' / '.join(criteria)} only, not {self.criterion!r}; "
                                 f"leave it out")
        if self.criterion == "lamp" and self.normalizer != "default":
            raise ValueError("criterion='lamp' is itself a normalisation (LAMP scores); leave normalizer at 'default'")
        return self


def import_torch_pruning() -> Any:
    try:
        import torch_pruning
    except ImportError as exc:
        raise SparsifyError("adapter 'torch_pruning' needs Torch-Pruning: pip install torch-pruning") from exc
    return torch_pruning


def make_importance(config: TorchPruningConfig) -> Any:
    """The Torch-Pruning importance object for ``config``."""
    imp = import_torch_pruning().importance
    norm = ("lamp" if config.criterion == "lamp" else "mean") if config.normalizer == "default" else config.normalizer
    reduce = config.group_reduction
    if config.criterion == "magnitude":
        return imp.GroupMagnitudeImportance(p=config.p, group_reduction=reduce, normalizer=norm, bias=config.bias)
    if config.criterion == "lamp":
        return imp.LAMPImportance(p=config.p, group_reduction=reduce, normalizer=norm, bias=config.bias)
    if config.criterion == "bn_scale":
        return imp.BNScaleImportance(group_reduction=reduce, normalizer=norm)
    if config.criterion == "taylor":
        return imp.GroupTaylorImportance(group_reduction=reduce, normalizer=norm, multivariable=config.multivariable,
                                         bias=config.bias)
    return imp.GroupHessianImportance(group_reduction=reduce, normalizer=norm, bias=config.bias)


@dataclass
class Root:
    """One TP pruning group, rooted at ``member``'s layer: its channel i scores structure ``member.structure_of[i]``."""

    member: Member
    group: Any  # torch_pruning.dependency.Group
    modules: list[nn.Module]  # the model's modules in the TP group (what the criterion reads)


@contextlib.contextmanager
def unparametrized(modules: list[nn.Module]) -> Iterator[None]:
    """Show TP the stored tensors (and their gradients), not the masked ones, by lifting the modules'
    parametrizations for the duration; the same parametrization objects are put back."""
    lifted = []
    try:
        for module in dict.fromkeys(modules):
            if parametrize.is_parametrized(module):
                for name in list(module.parametrizations):
                    lifted.append((module, name, list(module.parametrizations[name])))
                    parametrize.remove_parametrizations(module, name, leave_parametrized=False)
        yield
    finally:
        for module, name, plist in reversed(lifted):
            for p in plist:
                parametrize.register_parametrization(module, name, p, unsafe=True)


class TorchPruningAdapter(FilterNormAdapter):
    """Covers every channel group whose coupling Torch-Pruning models the same way; one vector per group."""

    config: TorchPruningConfig
    learnable: ClassVar[bool] = False  # the scores are computed: mask policies only

    def __init__(self, config: TorchPruningConfig) -> None:
        super().__init__(config)
        self.tp = import_torch_pruning()
        self.importance = make_importance(config)
        self._vectors: list[ImportanceVector] = []
        self._squares: dict[nn.Parameter, tuple[torch.Tensor, int]] = {}  # hessian: Σ grad², samples

    @property
    def needs_gradients(self) -> bool:
        return self.config.criterion in _GRADIENT_CRITERIA

    # ----- covering groups ----------------------------------------------------------------------
    def vectors(self, cg: ChannelGraph) -> list[ImportanceVector]:
        groups = cg.prunable_groups()
        graph, why = self._dependency_graph(cg)
        names = {m: n for n, m in cg.model.named_modules()}
        out = []
        for group in groups:
            roots, reason = (None, why) if graph is None else self._roots(cg.model, graph, group, names)
            if roots is None:
                self.skipped[group.name] = reason
                continue
            scaled = scaled_members(cg, group)
            handle = {"model": cg.model, "roots": roots, "scaled": scaled, "cache": None}
            out.append(ImportanceVector(group.name, group, np.arange(group.width), self, handle=handle))
        self._vectors = out
        return out

    def _dependency_graph(self, cg: ChannelGraph) -> tuple[Any, str]:
        model = cg.model
        if is_meta(model):
            return None, "the model is on the meta device (no weights to score); use a model with real weights"
        modes = {m: m.training for m in model.modules()}  # TP's tracing switches the model to eval mode
        try:
            with torch.enable_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # TP warns about parameters outside its layer types
                graph = self.tp.DependencyGraph().build_dependency(model, example_inputs=tuple(cg.traced.inputs),
                                                                   verbose=False)
        except Exception as exc:  # every group is then reported, with TP's error
            return None, f"Torch-Pruning could not trace the model ({type(exc).__name__}: {exc})"
        finally:
            for m, mode in modes.items():
                m.training = mode
        return graph, ""

    def _roots(self, model: nn.Module, graph: Any, group: ChannelGroup, names: dict[nn.Module, str]
               ) -> tuple[list[Root] | None, str]:
        if group.kind != "channel":
            return None, f"its structures are {group.kind}s; Torch-Pruning scores single channels"
        ours = {(m.module, _side(m)) for m in group.members if m.role != "other"
                and isinstance(_module(model, m), _SCORED)}
        covered = np.zeros(group.width, dtype=bool)
        roots: list[Root] = []
        seen: set[tuple[str, str]] = set()
        for m in group.members:
            module = _module(model, m)
            if m.role != "out" or not isinstance(module, _ROOTS) or m.tensor != _weight(m.module):
                continue
            mine = np.zeros(group.width, dtype=bool)
            mine[m.structure_of] = True
            if (covered & mine).any():
                if (m.module, "out") in seen and not (mine & ~covered).any():
                    continue  # the same TP group, rooted at another of its layers
                return None, f"Torch-Pruning couples {m.module}'s channels with other layers than sparsify does"
            root, reason = self._root(graph, names, module, m, group)
            if root is None:
                return None, reason
            roots.append(root)
            seen |= {(names[mod], side) for mod, side in _layers(graph, root.group, names)}
            covered |= mine
        if not roots:
            return None, "no Conv/Linear produces these channels (Torch-Pruning roots its groups at their outputs)"
        if not covered.all():
            return None, f"{int((~covered).sum())} structures have no Conv/Linear producer to root a TP group at"
        if seen != ours:
            diff = sorted((seen - ours) | (ours - seen))[:3]
            return None, f"Torch-Pruning couples other layers than sparsify does (differ: {diff})"
        if self.config.criterion == "bn_scale" and not all(
                any(isinstance(mod, nn.modules.batchnorm._BatchNorm) for mod in r.modules) for r in roots):
            return None, "a BatchNorm scales none or only some of these channels (bn_scale scores |γ|)"
        return roots, ""

    def _root(self, graph: Any, names: dict[nn.Module, str], module: nn.Module, member: Member,
              group: ChannelGroup) -> tuple[Root | None, str]:
        tp = self.tp
        if module not in graph.module2node:
            return None, f"Torch-Pruning's graph does not reach {member.module}"
        width = original(module, "weight").shape[member.dim]
        if len(member.structure_of) != width:
            return None, f"{member.module} has {width} output channels, the group indexes {len(member.structure_of)}"
        fn = tp.prune_linear_out_channels if isinstance(module, nn.Linear) else tp.prune_conv_out_channels
        tp_group = graph.get_pruning_group(module, fn, idxs=list(range(width)))
        by_side = {(m.module, _side(m)): m for m in group.members if m.role != "other"}
        for item in tp_group:
            layer = item.dep.target.module
            if layer not in names:
                continue  # TP's element-wise / reshape nodes carry no parameters
            side = "out" if graph.is_out_channel_pruning_fn(item.dep.handler) else "in"
            ours = by_side.get((names[layer], side))
            if ours is None:
                if isinstance(layer, _SCORED):
                    return None, f"Torch-Pruning couples {names[layer]} ({side}) with {member.module}, sparsify not"
                continue
            idxs = np.asarray([int(i) for i in item.idxs])
            root_idxs = np.asarray([int(i) for i in item.root_idxs])
            if (idxs >= len(ours.structure_of)).any() or not np.array_equal(
                    ours.structure_of[idxs], member.structure_of[root_idxs]):
                return None, f"Torch-Pruning maps {names[layer]}'s channels to {member.module}'s differently"
        modules = [layer for layer, _ in _layers(graph, tp_group, names)]
        return Root(member, tp_group, list(dict.fromkeys(modules))), ""

    # ----- scores ---------------------------------------------------------------------------------
    def raw(self, vector: ImportanceVector) -> torch.Tensor:
        if self.needs_gradients:
            if vector.handle["cache"] is None:
                self.refresh([vector] if vector not in self._vectors else None)
            return vector.handle["cache"][1]
        key = tuple((id(t), t._version) for t in _tensors(vector))
        cache = vector.handle["cache"]
        if cache is None or cache[0] != key:
            vector.handle["cache"] = cache = (key, self._score(vector))
        return cache[1]

    def refresh(self, vectors: list[ImportanceVector] | None = None) -> None:
        """Score ``vectors`` (default: all of this adapter's) now, from the current weights and, for
        taylor / hessian, the gradients present now (see the module docstring)."""
        vectors = self._vectors if vectors is None else vectors
        with self._hessian_gradients(vectors):
            for v in vectors:
                v.handle["cache"] = (None, self._score(v))
        self._squares = {}

    def accumulate_grad(self, model: nn.Module) -> None:
        """hessian: add the squares of the gradients present now (call after each per-sample backward)."""
        for p in model.parameters():
            if p.grad is not None:
                total, n = self._squares.get(p, (None, 0))
                sq = p.grad.detach().pow(2)
                self._squares[p] = (sq if total is None else total + sq, n + 1)

    def _score(self, vector: ImportanceVector) -> torch.Tensor:
        roots: list[Root] = vector.handle["roots"]
        with unparametrized([m for r in roots for m in r.modules]):
            self._check_gradients(vector, roots)
            scores = [self.importance(r.group) for r in roots]
        weight = original(_module(vector.handle["model"], roots[0].member), "weight")
        dtype, device = weight.dtype, weight.device
        total = torch.zeros(len(vector), dtype=dtype, device=device)
        counts = torch.zeros(len(vector), dtype=dtype, device=device)
        for root, score in zip(roots, scores, strict=True):
            if score is None:
                raise SparsifyError(f"Torch-Pruning's {self.config.criterion!r} criterion scored no layer of group "
                                    f"'{vector.name}' (for hessian: no gradients reached it)")
            index = torch.as_tensor(root.member.structure_of, device=device)
            total = total.index_add(0, index, score.to(device, dtype))
            counts = counts.index_add(0, index, torch.ones_like(index, dtype=dtype))
        if self.config.structure_reduction == "mean":
            total = total / counts.clamp_min(1)
        if not torch.isfinite(total).all():
            raise SparsifyError(f"Torch-Pruning's {self.config.criterion!r} scores of group '{vector.name}' are not "
                                "finite (all-zero scores divided by their mean?); set normalizer=None, or for "
                                "taylor / hessian check that the loss reaches these layers")
        return total.detach()

    def _check_gradients(self, vector: ImportanceVector, roots: list[Root]) -> None:
        if not self.needs_gradients:
            return
        names = {m: n for n, m in vector.handle["model"].named_modules()}
        missing = [names[m] for r in roots for m in r.modules if not isinstance(m, nn.modules.batchnorm._BatchNorm)
                   and any(t.grad is None for t in _stored(m, bias=self.config.bias))]
        if missing:
            fix = ("run loss.backward() (per sample: then adapter.accumulate_grad(model)) before the scores are read"
                   if self.config.criterion == "hessian" else "run loss.backward() before the scores are read")
            raise SparsifyError(f"criterion {self.config.criterion!r} reads gradients, but {len(missing)} layers of "
                                f"group '{vector.name}' have none: {fix} — before creating the Sparsifier or calling "
                                "apply_plan, and then after backward() whenever you call adapter.refresh()")

    @contextlib.contextmanager
    def _hessian_gradients(self, vectors: list[ImportanceVector]) -> Iterator[None]:
        """hessian: TP reads the curvature from ``.grad``; put E[grad²] there for the scoring only."""
        if self.config.criterion != "hessian":
            yield
            return
        params = {t for v in vectors for r in v.handle["roots"] for m in r.modules for t in _stored(m)}
        saved = {p: p.grad for p in params}
        try:
            for p in params:
                if p in self._squares:
                    total, n = self._squares[p]
                    p.grad = total / n
                elif p.grad is not None:
                    p.grad = p.grad.detach().pow(2)
            yield
        finally:
            for p, g in saved.items():
                p.grad = g

    # ----- masks ------------------------------------------------------------------------------------
    def install(self, vector: ImportanceVector, transform: nn.Module) -> None:
        if getattr(transform, "constant_factor", None) is None:
            raise SparsifyError(f"adapter 'torch_pruning' computes its scores ({self.config.criterion}), it has no "
                                f"learnable vector for a {type(transform).__name__}: use policy='gmp' (or "
                                "sparsify.oneshot.apply_plan); for str / slimming use adapter='bn_gamma'")
        super().install(vector, transform)


def _module(model: nn.Module, member: Member) -> nn.Module:
    return model.get_submodule(member.module) if member.module else model


def _weight(module: str) -> str:
    return f"{module}.weight" if module else "weight"


def _side(member: Member) -> str:
    return "in" if member.role == "in" else "out" if member.role in _OUT_ROLES else "other"


def _layers(graph: Any, tp_group: Any, names: dict[nn.Module, str]) -> list[tuple[nn.Module, str]]:
    """The model's modules of a TP group that carry weights TP may score, with the side TP prunes."""
    out = []
    for item in tp_group:
        layer = item.dep.target.module
        if layer in names and isinstance(layer, _SCORED):
            out.append((layer, "out" if graph.is_out_channel_pruning_fn(item.dep.handler) else "in"))
    return out


def _stored(module: nn.Module, bias: bool = True) -> list[torch.Tensor]:
    """``module``'s stored weight (and bias), beneath any parametrization; those it has."""
    names = ("weight", "bias") if bias else ("weight",)
    return [original(module, n) for n in names
            if module._parameters.get(n) is not None or parametrize.is_parametrized(module, n)]


def _tensors(vector: ImportanceVector) -> list[torch.Tensor]:
    """The stored tensors the scores of ``vector`` read (their versions key the cache)."""
    return [t for r in vector.handle["roots"] for m in r.modules for t in _stored(m)]


register_adapter("torch_pruning", TorchPruningConfig, TorchPruningAdapter)
