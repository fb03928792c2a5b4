"""``Sparsifier``: wrap a model, call ``step()`` while training, ``prune()`` at the end."""

from __future__ import annotations

import contextlib
import copy
import functools
import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from torch import nn
from torch.nn.utils import parametrize

from sparsify._undo import ModelUndo
from sparsify.adapters import AdapterConfig, ImportanceVector, list_adapters, make_adapter
from sparsify.adapters.base import Baked
from sparsify.config import SparsifierConfig
from sparsify.errors import PruneError, SparsifyError
from sparsify.graph.channel_graph import ChannelGraph, build_channel_graph
from sparsify.graph.cost import MacsModel, count_params, module_macs, structure_costs
from sparsify.graph.trace import trace
from sparsify.measure.latency_model import LatencyModel
from sparsify.policies import PolicyConfig, make_policy
from sparsify.policies.base import GroupView, PolicyContext, producer_shape
from sparsify.prune.guards import check_no_forward_hooks
from sparsify.prune.select import removal_plan
from sparsify.prune.surgery import PruneReport, prune_channels
from sparsify.sparsifier_checks import (
    check_config,
    check_model,
    check_no_live_sparsifier,
    check_state,
    placement,
    tied_elsewhere,
)

_DEFAULT_ADAPTER, _DEFAULT_POLICY = "bn_gamma", "str"


@dataclass
class GroupStatus:
    """One row of ``Sparsifier.report()``."""

    name: str
    width: int
    zeros: int
    params: float  # parameters the zero structures account for (first-order)
    macs: float
    exact: bool = True  # False: an opted-in inexact group (include_inexact), whose removal changes the function


@dataclass
class SparsityReport:
    groups: list[GroupStatus]
    params: int
    macs: int
    thresholds: dict[str, float] = field(default_factory=dict)

    @property
    def channel_sparsity(self) -> float:
        total = sum(g.width for g in self.groups)
        return sum(g.zeros for g in self.groups) / max(total, 1)

    def table(self) -> Table:
        t = Table(title=f"sparsity: {self.channel_sparsity:.1%} of {sum(g.width for g in self.groups)} structures")
        for col in ("group", "width", "zeros", "params in zeros", "MACs in zeros"):
            t.add_column(col, justify="left" if col == "group" else "right")
        for g in self.groups:
            t.add_row(g.name, str(g.width), str(g.zeros), f"{g.params:,.0f}", f"{g.macs:,.0f}")
        return t

    def __str__(self) -> str:
        """The table as plain text, so that ``print(sp.report())`` shows it."""
        console = Console(file=io.StringIO(), width=120, color_system=None)
        console.print(self.table())
        return console.file.getvalue().rstrip("\n")


@dataclass
class PruneResult:
    """What ``Sparsifier.prune()`` did."""

    model: nn.Module
    surgery: PruneReport
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    widths: dict[str, tuple[int, int]]
    kept_to_stay_connected: list[str] = field(default_factory=list)
    latency: Any = None  # a latency target's LatencyTargetReport (estimated and measured ms), else None

    def __repr__(self) -> str:
        changed = sum(before != after for before, after in self.widths.values())
        return (f"PruneResult({type(self.model).__name__}: params {self.params_before:,} → {self.params_after:,}, "
                f"MACs {self.macs_before:,} → {self.macs_after:,}, {changed} of {len(self.widths)} groups narrower)")

    def table(self) -> Table:
        t = Table(title="pruned")
        for col in ("", "before", "after", "ratio"):
            t.add_column(col, justify="right")
        t.add_row("params", f"{self.params_before:,}", f"{self.params_after:,}",
                  f"{self.params_before / max(self.params_after, 1):.2f}×")
        t.add_row("MACs", f"{self.macs_before:,}", f"{self.macs_after:,}",
                  f"{self.macs_before / max(self.macs_after, 1):.2f}×")
        return t


class Sparsifier:
    """Structured sparsity as unstructured sparsity on importance vectors.

    Example:
        >>> sp = Sparsifier(model, example_inputs, adapter="bn_gamma", policy="str")
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)   # after: includes STR thresholds
        >>> for x, y in loader: loss_fn(model(x), y).backward(); opt.step(); opt.zero_grad(); sp.step()
        >>> result = sp.prune(optimizer=opt)                     # physically smaller, same function

    Create the optimizer after the Sparsifier (learned thresholds are model parameters), or add
    ``sp.parameters()`` to it. With the ``str`` policy the outputs change slightly as soon as the
    Sparsifier exists (every vector is thresholded by sigmoid(s_init), about 1 % relative by default):
    measure the dense model before. A model that already carries another Sparsifier's masks, a
    wrapper (DataParallel, torch.compile, TorchScript) or channels under someone else's parametrization
    (weight_norm, ...) is refused or left out with the fix; on any error the model is left as it was.
    Groups whose removal is inexact (LayerNorm/RMSNorm over the channels) are left out unless the adapter
    config sets ``include_inexact`` (with ``verify_atol=None``).
    Give either ``adapter``/``policy`` or a whole ``config``, not both.
    ``latency_model`` (a :class:`sparsify.measure.LatencyModel`, or a function of the Sparsifier's
    channel graph that builds one) is what ``GMPConfig(budget="latency")`` allocates by.
    """

    @torch.inference_mode(False)  # masks and thresholds made inside inference_mode could not be trained or updated
    def __init__(self, model: nn.Module, example_inputs: Any,
                 adapter: str | dict | AdapterConfig = _DEFAULT_ADAPTER,
                 policy: str | dict | PolicyConfig = _DEFAULT_POLICY, *, config: SparsifierConfig | None = None,
                 latency_model: LatencyModel | Callable[[ChannelGraph], LatencyModel] | None = None) -> None:
        if config is not None and (adapter != _DEFAULT_ADAPTER or policy != _DEFAULT_POLICY):
            raise SparsifyError("Sparsifier got both config= and adapter=/policy=; the config already names the "
                                "adapter and the policy: pass SparsifierConfig(adapter=..., policy=..., ...) alone, "
                                "or adapter=/policy= without config=")
        check_model(model)
        check_config(config)
        self.config = config or SparsifierConfig(adapter=adapter, policy=policy)
        if isinstance(model, nn.parallel.DistributedDataParallel):  # its reducer would miss the new parameters
            raise SparsifyError("create the Sparsifier on the plain model, then wrap that model in "
                                "DistributedDataParallel (see sparsify.distributed)")
        check_no_live_sparsifier(model)
        check_no_forward_hooks(model, "Sparsifier", SparsifyError)
        self.model = model
        self.graph: ChannelGraph = build_channel_graph(model, example_inputs)
        self._macs = module_macs(self.graph.traced)
        self.adapter = make_adapter(self.config.adapter)
        undo = ModelUndo(model)  # the constructor is atomic: on any error the model is as it was
        try:
            self._attach(latency_model)
        except BaseException:
            undo.restore()
            raise
        self._modules_at_build = {m.module: model.get_submodule(m.module) for g in self.groups
                                  for v in g.vectors for m in v.group.members}
        self._placement = placement(model)
        self.step_count = 0
        self.pruned = False

    def _attach(self, latency_model: LatencyModel | Callable[[ChannelGraph], LatencyModel] | None) -> None:
        model = self.model
        vectors = self._untied_vectors(self._exact_vectors(self.adapter.vectors(self.graph)))
        if not vectors:
            reasons = "; ".join(f"{k}: {v}" for k, v in list(self.adapter.skipped.items())[:5])
            barriers = "; ".join(list(dict.fromkeys(g.why_not() for g in self.graph.groups if not g.prunable))[:2])
            raise SparsifyError(
                f"adapter {self.config.adapter.kind!r} covers no prunable group of {type(model).__name__} "
                f"({len(self.graph.prunable_groups())} prunable groups; {reasons or 'none'}). "
                + ("" if self.graph.prunable_groups() or not barriers else f"Barriers: {barriers}. ")
                + (f"Try another adapter ({', '.join(k for k in list_adapters() if k != self.config.adapter.kind)}), "
                   "or check `sparsify inspect` for barriers."))
        self.groups = self._group_views(vectors)
        self.macs_model = MacsModel(self.graph, self._macs)
        if latency_model is not None and not isinstance(latency_model, LatencyModel):
            latency_model = latency_model(self.graph)
            if not isinstance(latency_model, LatencyModel):
                raise SparsifyError(f"latency_model must be a sparsify.measure.LatencyModel or a function of the "
                                    f"channel graph returning one; the function returned "
                                    f"{type(latency_model).__name__}")
        self.policy = make_policy(self.config.policy)
        self.policy.attach(self.groups, PolicyContext(cost_model=self.macs_model, latency_model=latency_model,
                                                      round_to=self.config.round_to))

    def _exact_vectors(self, vectors: list[ImportanceVector]) -> list[ImportanceVector]:
        """Vectors of exact groups only, unless the adapter config opts in with ``include_inexact`` (then
        prune() removes them inexactly, which the output check would refuse: verify_atol must be None)."""
        inexact = {v.group.name: v.group.inexact[0] for v in vectors if not v.group.exact}
        if not inexact:
            return vectors
        if getattr(self.config.adapter, "include_inexact", False):
            if self.config.verify_atol is not None:
                raise SparsifyError(
                    f"include_inexact covers {len(inexact)} inexact groups ({', '.join(list(inexact)[:3])}): pruning "
                    "them changes the network's function, which prune()'s output check (verify_atol="
                    f"{self.config.verify_atol}) would refuse after training. Pass SparsifierConfig(..., "
                    "verify_atol=None) to accept that change, or leave include_inexact off")
            return vectors
        opt_in = ("set include_inexact=True on the adapter config to cover it" if "include_inexact"
                  in type(self.config.adapter).model_fields else "this adapter cannot cover it")
        for name, why in inexact.items():
            self.adapter.skipped[name] = f"inexact ({why}); {opt_in}"
        return [v for v in vectors if v.group.exact]

    def _untied_vectors(self, vectors: list[ImportanceVector]) -> list[ImportanceVector]:
        """Vectors whose parametrized tensors no other module shares: a mask installed on one module of tied
        weights would not reach the other module, so the soft model would not be the one prune() bakes."""
        out = []
        for v in vectors:
            tied = [(f"{type(m).__name__}.{attr}", other) for m, attr in v.adapter.parametrized(v)
                    if (other := tied_elsewhere(self.model, m, attr)) is not None]
            if tied:
                self.adapter.skipped[v.name] = (f"tied weights: {tied[0][0]} is also {tied[0][1]}, which a mask on one "
                                                "module would not reach; untie them, or prune with prune_channels")
            else:
                out.append(v)
        return out

    # ----- training-time ---------------------------------------------------------------------
    def step(self) -> None:
        """Advance the policy's schedule; call once per optimizer step."""
        self._check_live()
        self.step_count += 1
        self.policy.step(self.step_count)

    def parameters(self) -> list[nn.Parameter]:
        """Learnable parameters the policy added (STR thresholds); they are also model parameters."""
        seen, out = set(), []
        for g in self.groups:
            for v in g.vectors:
                for p in (v.transform.parameters() if v.transform is not None else ()):
                    if id(p) not in seen:
                        seen.add(id(p))
                        out.append(p)
        return out

    @contextlib.contextmanager
    def cached(self, batched: bool = True) -> Iterator[None]:
        """Context for the training forward: every parametrized tensor (an STR-BN γ read by both the
        weight and the bias of its BatchNorm) is computed once per forward instead of at each read,
        and, with ``batched``, all of them at entry from one chain of kernels when the policy and the
        adapter support it (STR on bn_gamma). Same values and gradients, far fewer kernels. Enter it
        inside the forward that is differentiated (inside a CUDA-graphed callable, not around it)."""
        with parametrize.cached():
            if batched and not self.pruned:
                self._prefill_parametrizations()
            yield

    def _prefill_parametrizations(self) -> None:
        batched = self.policy.batched_effective()
        if batched is None:
            return
        effective, sizes = batched
        for module, name, value in self.adapter.batched_parametrized_values(self.vectors, effective, sizes) or ():
            parametrize._cache[(id(module), name)] = value

    @property
    def vectors(self) -> list[ImportanceVector]:
        return [v for g in self.groups for v in g.vectors]

    def zero_structures(self) -> dict[int, np.ndarray]:
        """Per covered group id, the structures that every covering vector has zeroed."""
        self._check_live()
        return {gid: np.flatnonzero(~k) for gid, k in self.policy.keep_vectors().items()}

    def report(self) -> SparsityReport:
        """Per group: width, zeroed structures, and the params/MACs they account for."""
        zeros = self.zero_structures()
        rows = []
        for g in self.groups:
            z = zeros[g.id]
            rows.append(GroupStatus(g.name, g.width, len(z), float(g.params[z].sum()), float(g.macs[z].sum()),
                                    exact=all(v.group.exact for v in g.vectors)))
        return SparsityReport(rows, count_params(self.model), sum(self._macs.values()), self.policy.thresholds())

    # ----- the end ---------------------------------------------------------------------------
    @torch.inference_mode(False)  # tensors sliced inside the caller's inference_mode would be unusable for training
    def prune(self, optimizer: torch.optim.Optimizer | None = None) -> PruneResult:
        """Remove every zeroed structure physically; returns the (same, now smaller) model and a report.

        The policy's transforms are baked into the weights first. The pruned model computes what
        the soft model did (checked on the example inputs unless ``verify_atol`` is None). On any
        failure the model, its parametrizations and the optimizer are restored.
        """
        self._check_live()
        self._check_model_unchanged()
        check_no_forward_hooks(self.model, "prune()", SparsifyError)
        self.policy.finalize()
        by_id = {g.id: g for g in self.groups}
        plan, kept = removal_plan(self.graph, self.policy.keep_vectors(),
                                  functools.cache(lambda gid: by_id[gid].magnitude()), round_to=self.config.round_to)
        policy_params = sum(p.numel() for p in self.parameters())
        params_before, macs_before = count_params(self.model) - policy_params, sum(self._macs.values())
        baked: list[Baked] = []
        undo = ModelUndo(self.model)  # a failed prune puts back the very parametrization objects and classes
        try:
            for v in self.vectors:
                baked.extend(v.adapter.bake(v))
            surgery = prune_channels(self.graph, plan, optimizer=optimizer, verify_atol=self.config.verify_atol,
                                     allow_inexact=any(not self.graph.group(gid).exact for gid in plan))
        except Exception as exc:
            for b in reversed(baked):
                b.param.data = b.data
            undo.restore()
            if isinstance(exc, PruneError):
                raise
            raise PruneError(f"prune() failed and the model was restored: {type(exc).__name__}: {exc}") from exc
        self.pruned = True
        macs_after = sum(module_macs(trace(self.model, self.graph.traced.inputs)).values())
        return PruneResult(self.model, surgery, params_before, count_params(self.model), macs_before, macs_after,
                           surgery.widths, kept, getattr(self.policy, "latency_report", None))

    # ----- state -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Step count, policy state, every transform's tensors (thresholds, masks) and the vectors' names and widths."""
        return {
            "step_count": self.step_count,
            "config": self.config.model_dump(mode="json"),
            "policy": self.policy.state_dict(),
            "transforms": [v.transform.state_dict() if v.transform is not None else {} for v in self.vectors],
            "vectors": [[v.name, len(v)] for v in self.vectors],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume: restores thresholds, masks and the schedule position exactly; on any error nothing changes."""
        self._check_live()
        check_state(state)
        if state["config"] != self.config.model_dump(mode="json"):
            raise SparsifyError("this state was saved by a Sparsifier with a different config; build the "
                                "Sparsifier with the same adapter and policy settings before loading it")
        if len(state["transforms"]) != len(self.vectors):
            raise SparsifyError(f"state has {len(state['transforms'])} importance vectors, this model has "
                                f"{len(self.vectors)}: it was saved from a different model")
        ours = [[v.name, len(v)] for v in self.vectors]
        if "vectors" in state and [list(x) for x in state["vectors"]] != ours:
            theirs = next((t, o) for t, o in zip(state["vectors"], ours, strict=True) if list(t) != o)
            raise SparsifyError(f"state's importance vector {theirs[0][0]!r} (width {theirs[0][1]}) is "
                                f"{theirs[1][0]!r} (width {theirs[1][1]}) here: it was saved from a different model. "
                                "Build the Sparsifier on the same architecture before loading it")
        backup = copy.deepcopy(self.state_dict())
        try:
            self._load(state)
        except Exception as exc:
            self._load(backup)
            raise SparsifyError(f"this state does not fit this Sparsifier ({type(exc).__name__}: {exc}); nothing was "
                                "loaded. It was saved from a different model or sparsify version: build the "
                                "Sparsifier on the same architecture and settings") from exc

    def _load(self, state: dict[str, Any]) -> None:
        self.policy.load_state_dict(state["policy"])
        for v, s in zip(self.vectors, state["transforms"], strict=True):
            if v.transform is not None:
                v.transform.load_state_dict(s)
        self.step_count = state["step_count"]

    # ----- helpers ---------------------------------------------------------------------------
    def _check_live(self) -> None:
        if self.pruned:
            raise SparsifyError("this Sparsifier has already pruned its model; create a new Sparsifier "
                                "(on the pruned model) to sparsify further")

    def _check_model_unchanged(self) -> None:
        """The model still holds the modules the Sparsifier was built on, on the same devices and dtypes, and only
        its masks parametrize them."""
        now_placed = placement(self.model)
        if now_placed != self._placement:
            def show(p: set[tuple[str, torch.dtype]]) -> str:
                return ", ".join(sorted(f"{dtype} on {device}".replace("torch.", "") for device, dtype in p))
            raise SparsifyError(f"the model was moved or cast after the Sparsifier was built (its tensors were "
                                f"{show(self._placement)}, now {show(now_placed)}); the recorded example inputs no "
                                "longer fit it. Move/cast it back (model.to(...)) before prune(), or build the "
                                "Sparsifier after moving the model")
        for name, module in self._modules_at_build.items():
            try:
                now = self.model.get_submodule(name) if name else self.model
            except AttributeError:
                now = None
            if now is not module:
                raise SparsifyError(f"module {name!r} of the model was replaced or removed after the Sparsifier was "
                                    "built; its masks are on the old module. Build a new Sparsifier on the model as "
                                    "it is now")
        for v in self.vectors:  # every tensor pruning slices, not only the ones the adapter parametrized
            for member in v.group.members:
                module_name, _, attr = member.tensor.rpartition(".")
                module = self.model.get_submodule(module_name) if module_name else self.model
                plist = module.parametrizations[attr] if parametrize.is_parametrized(module, attr) else ()
                foreign = [type(p).__name__ for p in plist if not type(p).__module__.startswith("sparsify.")]
                if foreign:
                    raise SparsifyError(f"{attr!r} of {type(module).__name__} (vector {v.name!r}) was parametrized "
                                        f"({', '.join(foreign)}) after the Sparsifier was built; remove that "
                                        "parametrization before prune(), or build the Sparsifier on the model as it "
                                        "is now (which refuses such channels)")

    def _group_views(self, vectors: list[ImportanceVector]) -> list[GroupView]:
        by_group: dict[int, list[ImportanceVector]] = {}
        for v in vectors:
            by_group.setdefault(v.group.id, []).append(v)
        views = []
        for gid, vs in by_group.items():
            group = self.graph.group(gid)
            params, macs = structure_costs(self.graph, group, self._macs)
            views.append(GroupView(group.name, group.width, vs, params, macs, producer_shape(self.graph, group)))
        return views
