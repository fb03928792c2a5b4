"""Width plans: decide how many structures each group keeps, apart from which ones.

``make_plan`` needs only shapes (it runs on a model built on the ``meta`` device: a LLaMA-7B plan
costs seconds and well under a gigabyte); ``apply_plan`` picks the structures to keep on a real
model by importance (any registered adapter kind: filter norms, Wanda-style activations, ...), turns
them into a removal plan with ``sparsify.prune.select.removal_plan`` (as ``Sparsifier.prune`` does)
and prunes with the transactional surgery. A plan is a pydantic model: ``plan.to_json()`` /
``WidthPlan.from_json``.

    >>> with torch.device("meta"):
    ...     big = LlamaForCausalLM(config_7b)
    >>> plan = make_plan(big, {"input_ids": torch.zeros(1, 8, dtype=torch.long, device="meta")}, 0.5)
    >>> apply_plan(small_real_model, inputs, plan, importance="activation", calibration=batches)
"""

from __future__ import annotations

import math
import numbers
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from sparsify._utils import is_meta
from sparsify.adapters import ADAPTERS, AdapterConfig, make_adapter
from sparsify.errors import InexactPruneError, SparsifyError
from sparsify.graph.channel_graph import ChannelGraph, ChannelGroup, build_channel_graph
from sparsify.graph.cost import module_macs, structure_costs
from sparsify.policies.allocation import budgets
from sparsify.policies.allocation.budgets import ShapeBudget, Unit
from sparsify.policies.base import producer_shape, structure_magnitude, top_k_keep
from sparsify.prune.select import removal_plan, round_keep
from sparsify.prune.surgery import PruneReport, prune_channels

Importance = str | AdapterConfig | Callable[[ChannelGraph, ChannelGroup], Any]
"""An adapter kind (``"filter_norm"``, ``"activation"``, any registered one) or its config; ``"index"`` (the first
structures: reads no values, for meta models); or a function ``(graph, group) -> one value per structure``."""
INDEX = "index"
_ALIASES = {"magnitude": "filter_norm"}  # the name older scripts (benchmarks/meta_plan.py) use


class GroupPlan(BaseModel):
    """How many structures one channel group keeps."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(description="channel group name, as `sparsify inspect` prints it")
    kind: str = Field("channel", description="what a structure is: channel, head, kv_group, ...")
    width: int = Field(ge=1, description="structures in the planned model's group")
    keep: int = Field(ge=1, description="structures to keep in the planned model")
    exact: bool = Field(True, description="whether removing all-zero structures leaves the function unchanged")

    @model_validator(mode="after")
    def _keep_fits(self) -> GroupPlan:
        if self.keep > self.width:
            raise ValueError(f"group '{self.name}' keeps {self.keep} structures but has only {self.width}; "
                             "keep must be between 1 and width")
        return self

    @property
    def ratio(self) -> float:
        return self.keep / self.width


class WidthPlan(BaseModel):
    """Per channel group, the width to keep; serialisable, independent of weight values."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    model: str = Field(description="class name of the planned model")
    sparsity: float = Field(ge=0, le=1, description="target fraction of `unit` removed from the planned groups")
    unit: Unit = Field(description="what `sparsity` counts")
    budget: ShapeBudget = Field(description="how the target splits across groups")
    groups: list[GroupPlan] = Field(description="one entry per planned group")
    params: dict[str, float] = Field(default_factory=dict, description="first-order params: total, in groups, "
                                     "removed")
    macs: dict[str, float] = Field(default_factory=dict, description="first-order MACs per example: total, removed")

    @model_validator(mode="after")
    def _unique_names(self) -> WidthPlan:
        names = [g.name for g in self.groups]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"the plan lists groups {twice[:5]} more than once; give each group one entry")
        return self

    def to_json(self, path: str | Path | None = None) -> str:
        text = self.model_dump_json(indent=1)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> WidthPlan:
        text = str(text_or_path)
        if not text.lstrip().startswith("{"):
            if not Path(text).is_file():
                raise SparsifyError(f"WidthPlan.from_json: {text!r:.200} is neither JSON text nor an existing file; "
                                    "pass plan.to_json() output or the path it was written to")
            text = Path(text).read_text()
        return cls.model_validate_json(text)

    def group(self, name: str) -> GroupPlan:
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(name)


def _graph_of(model: nn.Module, example_inputs: Any, graph: ChannelGraph | None) -> ChannelGraph:
    """``graph`` if it was built on ``model`` itself, else a new graph of ``model``."""
    if graph is None:
        return build_channel_graph(model, example_inputs)
    if not isinstance(graph, ChannelGraph):
        raise SparsifyError(f"graph must be a ChannelGraph of this model (build_channel_graph(model, example_inputs)) "
                            f"or None, got {type(graph).__name__}")
    if graph.model is not model:
        raise SparsifyError(f"graph= was built on another model ({type(graph.model).__name__} object at "
                            f"{id(graph.model):#x}), not on this {type(model).__name__}: pass the graph of this model "
                            "(build_channel_graph(model, example_inputs)) or graph=None")
    return graph


def _planned_groups(cg: ChannelGraph, kinds: Iterable[str] | None, include_inexact: bool) -> list[ChannelGroup]:
    kinds = None if kinds is None else set(kinds)
    return [g for g in cg.prunable_groups() if (include_inexact or g.exact) and (kinds is None or g.kind in kinds)]


def make_plan(model: nn.Module, example_inputs: Any, sparsity: float, *, unit: Unit = "params",
              budget: ShapeBudget = "uniform", kinds: Iterable[str] | None = None,
              include_inexact: bool = False, min_keep: int = 1, graph: ChannelGraph | None = None,
              round_to: int | None = None, timings: dict[str, float] | None = None) -> WidthPlan:
    """Plan the width of every prunable group for removing ``sparsity`` of ``unit``.

    Reads only shapes, so ``model`` may live on the ``meta`` device. ``unit`` counts channels,
    parameters or MACs over the planned groups (first order, as the ``gmp`` policy does);
    ``budget='uniform'`` removes one common fraction of every group, ``'erk'`` more from large
    layers (RigL's Erdős–Rényi-Kernel on the producing weight shapes). Groups whose pruning is
    inexact (a LayerNorm/RMSNorm over the channels) are left out unless ``include_inexact``;
    ``kinds`` restricts the plan to groups of those kinds (``{"channel"}``, ``{"head", "kv_group"}``).
    ``round_to`` keeps every producing layer at a multiple of that many channels (or its full width),
    rounding up, as ``SparsifierConfig.round_to`` does (odd widths fall off fast GPU kernels: an MLP of
    863 neurons runs slower in bf16 than the dense 1408). ``timings``, if given, receives seconds per phase.
    """
    if isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Real) or not 0.0 <= sparsity < 1.0:
        raise SparsifyError(f"sparsity must be a number in [0, 1) (the fraction of {unit} to remove, e.g. 0.5), "
                            f"got {sparsity!r}")
    if unit not in get_args(Unit) or budget not in get_args(ShapeBudget):
        raise SparsifyError(f"unit must be one of {get_args(Unit)} and budget one of {get_args(ShapeBudget)} (a plan "
                            f"reads no weight values, so no 'global' ranking); got unit={unit!r}, budget={budget!r}")
    clock = time.perf_counter()
    cg = _graph_of(model, example_inputs, graph)
    if timings is not None:
        timings["graph"] = time.perf_counter() - clock
        clock = time.perf_counter()
    groups = _planned_groups(cg, kinds, include_inexact)
    if not groups:
        raise SparsifyError(
            f"{type(model).__name__} has no prunable{'' if include_inexact else ' exact'} channel group"
            f"{'' if kinds is None else f' of kinds {sorted(kinds)}'} to plan; check `sparsify inspect` for "
            "barriers" + ("" if include_inexact else ", or pass include_inexact=True") + ".")
    macs = module_macs(cg.traced)
    costs = [structure_costs(cg, g, macs) for g in groups]
    widths = np.array([g.width for g in groups], dtype=np.int64)
    zeros = [np.zeros(g.width) for g in groups]  # no weight values: removal order is structure order
    if unit == "channels" and budget == "uniform":
        keep = budgets.keep_counts_uniform(widths, sparsity, min_keep)
    else:
        cost = [np.ones(g.width) if unit == "channels" else c[0 if unit == "params" else 1]
                for g, c in zip(groups, costs, strict=True)]
        shapes = {i: producer_shape(cg, g) for i, g in enumerate(groups)} if budget == "erk" else None
        keep = budgets.keep_counts_for_cost(zeros, cost, sparsity, budget, erk_shapes=shapes, min_keep=min_keep)
    if round_to is not None and round_to != 1:
        keep = [int(round_keep(g, np.arange(g.width) < k, round_to).sum()) for g, k in zip(groups, keep, strict=True)]
    plans = [GroupPlan(name=g.name, kind=g.kind, width=g.width, keep=int(k), exact=g.exact)
             for g, k in zip(groups, keep, strict=True)]
    in_groups = sum(float(c[0].sum()) for c in costs)
    removed_params = sum(float(c[0][k:].sum()) for c, k in zip(costs, keep, strict=True))
    removed_macs = sum(float(c[1][k:].sum()) for c, k in zip(costs, keep, strict=True))
    plan = WidthPlan(model=type(model).__name__, sparsity=sparsity, unit=unit, budget=budget, groups=plans,
                     params={"total": float(sum(p.numel() for p in model.parameters())), "in_groups": in_groups,
                             "removed": removed_params},
                     macs={"total": float(sum(macs.values())), "removed": removed_macs})
    if timings is not None:
        timings["budget"] = time.perf_counter() - clock
    return plan


# ----- applying a plan to a real model ---------------------------------------------------------------


@dataclass
class PlanResult:
    """What ``apply_plan`` did."""

    model: nn.Module
    surgery: PruneReport
    keep: dict[str, int]  # group name → structures kept
    removed: dict[str, np.ndarray] = field(default_factory=dict)  # group name → removed structure indices
    compensation: Any = None  # with compensate=True: the bias changes (adapters.fluctuation.Compensation)


def group_importance(cg: ChannelGraph, groups: list[ChannelGroup], importance: Importance,
                     calibration: Iterable[Any] | None = None, adapters: list[Any] | None = None
                     ) -> dict[int, np.ndarray]:
    """Per group id, one importance value per structure (higher = keep).

    An adapter kind or config: per structure, the largest |value| of the adapter's importance vectors
    over it (``filter_norm``: norm of the producing filters; ``activation``: Wanda's Σ |W[:, s]|·‖X_s‖
    on ``calibration`` batches, required; ``"magnitude"`` is an alias of ``filter_norm``). ``"index"``
    keeps the first structures (reads no values: for meta models). A callable gets ``(cg, group)`` and
    returns ``group.width`` values. ``adapters``, if given, receives the adapter used.
    """
    if callable(importance):
        out = {}
        for g in groups:
            v = np.asarray(importance(cg, g), dtype=np.float64).reshape(-1)
            if v.shape != (g.width,) or not np.isfinite(v).all():
                raise SparsifyError(f"the importance function returned {v.shape} values (or NaN/inf) for group "
                                    f"'{g.name}' of width {g.width}; return one finite value per structure")
            out[g.id] = v
        return out
    if importance == INDEX:
        return {g.id: -np.arange(g.width, dtype=np.float64) for g in groups}
    config = _adapter_config(importance)
    if is_meta(cg.model):
        raise SparsifyError(f"importance={config.kind!r} reads weight values, but the model is on the meta device "
                            "(no data). Apply the plan to a model with real weights, or use importance='index' to "
                            "prune the architecture only.")
    adapter = make_adapter(config)
    if adapters is not None:
        adapters.append(adapter)
    calibrated = callable(getattr(adapter, "calibrate", None))  # statistics from `calibration` (activation, taylor…)
    wanted = {g.id for g in groups}
    vectors = [v for v in (adapter.vectors(cg, calibrate=False) if calibrated else adapter.vectors(cg))
               if v.group.id in wanted]
    covered = {v.group.id for v in vectors}
    missing = [g.name for g in groups if g.id not in covered]
    if missing:
        raise SparsifyError(f"importance={config.kind!r} does not cover groups {missing[:5]}: "
                            f"{[adapter.skipped.get(n, '?') for n in missing[:5]]}. Use importance='filter_norm' "
                            "or leave those groups out of the plan.")
    if calibrated:
        if calibration is None:
            raise SparsifyError(f"importance={config.kind!r} needs calibration batches (an iterable of model inputs)")
        adapter.calibrate(cg.model, calibration, vectors=vectors)
    return {g.id: structure_magnitude(g.width, [v for v in vectors if v.group.id == g.id]) for g in groups}


def _adapter_config(importance: str | AdapterConfig) -> AdapterConfig:
    if isinstance(importance, AdapterConfig):
        return importance
    kind = _ALIASES.get(importance, importance)
    if not isinstance(kind, str) or kind not in ADAPTERS:
        raise SparsifyError(f"unknown importance {importance!r}; use an adapter kind ({ADAPTERS.list()}) or its "
                            "config, 'index', or a callable (graph, group) -> vector")
    return ADAPTERS.config_class(kind)()


def apply_plan(model: nn.Module, example_inputs: Any, plan: WidthPlan, importance: Importance = "filter_norm", *,
               calibration: Iterable[Any] | None = None, match: Literal["auto", "ratio", "count"] = "auto",
               optimizer: torch.optim.Optimizer | None = None, allow_inexact: bool = False,
               round_to: int | None = None, graph: ChannelGraph | None = None,
               compensate: bool | Literal["add_bias"] = False
               ) -> PlanResult:
    """Prune ``model`` to ``plan``'s widths, keeping each group's most important structures.

    Groups are matched by name (same architecture family and layer names: e.g. a plan made on a
    LLaMA-7B-shaped meta model applied to a small LLaMA with the same layer count). ``match``:
    ``count`` keeps ``plan.keep`` structures (widths must equal), ``ratio`` keeps
    ``round(keep/width · width)`` of the real group, ``auto`` uses the count where widths agree.
    ``importance``: see :data:`Importance` (calibration defaults to the example inputs). A member layer
    the plan would empty (one branch of a concat) keeps its strongest structure; with ``round_to``
    every pruned layer keeps a multiple of ``round_to`` channels (the strongest removed structures come
    back), as in ``Sparsifier.prune``. The surgery is transactional: on any error the model is left
    unchanged. Removing structures that are not zero changes the function (one-shot pruning); the
    removed set is in the result. ``compensate`` (importance ``fluctuation``): fold each removed channel's
    calibration mean into the consumer's bias (FLAP; exact in expectation only), in ``result.compensation``;
    ``"add_bias"`` also gives a bias to consumers that have none (FLAP does, for LLaMA's o_proj/down_proj).
    """
    if not isinstance(plan, WidthPlan):
        fix = (" A dict {group: indices to remove} is a removal plan: prune it with "
               "sparsify.prune_channels(graph, plan)." if isinstance(plan, dict) else "")
        raise SparsifyError(f"apply_plan takes a WidthPlan (from make_plan or WidthPlan.from_json), got "
                            f"{type(plan).__name__}.{fix}")
    if match not in ("auto", "ratio", "count"):
        raise SparsifyError(f"match must be 'auto', 'ratio' or 'count', got {match!r}")
    if compensate not in (False, True, "add_bias"):
        raise SparsifyError(f"compensate must be False, True or 'add_bias', got {compensate!r}")
    if round_to is not None and (isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1):
        raise SparsifyError(f"round_to must be a positive int (e.g. 8) or None, got {round_to!r}")
    cg = _graph_of(model, example_inputs, graph)
    by_name = {g.name: g for g in cg.groups}
    unknown = [p.name for p in plan.groups if p.name not in by_name]
    if unknown:
        known = [g.name for g in cg.prunable_groups()][:8]
        raise SparsifyError(f"the plan names groups this {type(model).__name__} does not have: {unknown[:5]} "
                            f"({len(unknown)} in all); this model's prunable groups include {known}. Make the "
                            "plan on a model of the same family with the same layer names.")
    chosen: list[tuple[ChannelGroup, int]] = []
    for p in plan.groups:
        g = by_name[p.name]
        if not g.prunable:
            raise SparsifyError(f"group '{g.name}' is not prunable in this model: {g.why_not()}")
        if not g.exact and not allow_inexact:
            raise InexactPruneError(f"group '{g.name}' is inexact here ({g.inexact[0]}); pass allow_inexact=True to "
                                    "prune it anyway, or make the plan without include_inexact")
        if g.kind != p.kind:
            raise SparsifyError(f"group '{g.name}' holds structures of kind {g.kind!r} here but {p.kind!r} in the "
                                "plan; the plan was made for a different architecture")
        if match == "count" or (match == "auto" and g.width == p.width):
            if g.width != p.width:
                raise SparsifyError(f"group '{g.name}' has width {g.width}, the plan's has {p.width}; "
                                    "use match='ratio' to keep the same fraction")
            k = p.keep
        else:
            k = int(min(max(math.floor(p.ratio * g.width + 0.5), 1), g.width))
        chosen.append((g, k))
    if calibration is None:
        calibration = [example_inputs]
    used: list[Any] = []
    scores = group_importance(cg, [g for g, _ in chosen], importance, calibration, adapters=used)
    if compensate and not (used and callable(getattr(used[0], "compensation", None))):
        raise SparsifyError("compensate=True folds removed channels' means into biases and needs "
                            f"importance='fluctuation' (or its config); got importance={importance!r}")
    keep = {g.id: top_k_keep(scores[g.id], k) for g, k in chosen}
    removal, _ = removal_plan(cg, keep, scores.__getitem__, round_to=round_to)
    compensation = used[0].compensation(removal) if compensate else None  # reads the columns about to go
    surgery = prune_channels(cg, removal, allow_inexact=allow_inexact, optimizer=optimizer)
    if compensation is not None:
        compensation.apply(add_bias=compensate == "add_bias")
    names = {g.id: g.name for g, _ in chosen}
    return PlanResult(model, surgery, {g.name: g.width - len(removal.get(g.id, ())) for g, _ in chosen},
                      {names[gid]: s for gid, s in removal.items()}, compensation)
