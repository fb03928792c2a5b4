"""A latency target met on the device: choose structures by estimated cost, measure the pruned network, iterate.

The estimate (:class:`sparsify.measure.LatencyModel`, layers timed alone) picks *where* to remove; only a
measurement of the whole pruned network says *how much* it saves. ``solve_latency_target`` searches the
fraction of MACs removed (the knob of :func:`~sparsify.policies.allocation.latency_budget.allocate_by_latency`):

1. the first guess is the fraction whose *estimated* speedup equals the target;
2. each probe builds the pruned network (a deep copy, :func:`pruned_copy`) and measures it; the next guess
   is the fraction whose estimate equals the target corrected by measured / estimated at the last probe;
3. once probes bracket the target (one too slow, one fast enough) the next is the secant (in log ms)
   between them, bisection where the secant leaves the bracket;
4. it stops when the measured latency is within ``tolerance`` of the target, or after ``max_iterations``
   probes: then the least-pruned probe that meets the target, else the fastest probe, is returned, and the
   report says the target was missed. A result slower than the dense network is never returned (dense is).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from sparsify.graph.channel_graph import ChannelGraph
from sparsify.prune.select import removal_plan
from sparsify.prune.surgery import prune_channels

__all__ = ["LatencyProbe", "LatencyTargetReport", "pruned_copy", "solve_latency_target"]

Keeps = Mapping[int, np.ndarray]
_ESTIMATE_BISECT_STEPS = 14


@dataclass(frozen=True)
class LatencyProbe:
    """One pruned network tried: the MACs fraction asked for, its estimated and measured ms."""

    fraction: float
    estimated_ms: float
    measured_ms: float


@dataclass
class LatencyTargetReport:
    """How a latency target was met (or not): dense and chosen latencies, every probe, and why it stopped."""

    target_ms: float
    dense_ms: float  # measured
    dense_estimated_ms: float
    tolerance: float
    fraction: float = 0.0  # MACs fraction asked of the budget by the chosen probe (0: dense)
    estimated_ms: float = math.nan
    measured_ms: float = math.nan
    met: bool = False
    reason: str = ""
    probes: list[LatencyProbe] = field(default_factory=list)
    allocate_s: float = 0.0  # seconds spent choosing structures (the budget's allocations for the fractions tried)
    measure_s: float = 0.0  # seconds spent building and measuring networks (dense included)

    @property
    def target_speedup(self) -> float:
        return self.dense_ms / self.target_ms

    @property
    def speedup(self) -> float:
        """Measured dense ms / measured ms of the result."""
        return self.dense_ms / self.measured_ms

    @property
    def estimated_speedup(self) -> float:
        return self.dense_estimated_ms / self.estimated_ms

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update(target_speedup=self.target_speedup, speedup=self.speedup, estimated_speedup=self.estimated_speedup)
        return d


def pruned_copy(graph: ChannelGraph, keep: Keeps, magnitude: Callable[[int], np.ndarray],
                round_to: int | None = None) -> nn.Module:
    """A deep copy of ``graph.model`` with the structures ``keep`` marks False removed (as ``prune()`` would
    remove them: connectivity, rounding), for measuring. Values are not checked and constants not folded:
    only the shapes matter. Masks a policy installed are baked into the copy; the model is not touched."""
    model = copy.deepcopy(graph.model)
    _bake_parametrizations(model)
    twin = copy.copy(graph)
    twin.traced = dataclasses.replace(graph.traced, model=model)
    if not keep or all(np.asarray(k).all() for k in keep.values()):
        return model
    plan, _ = removal_plan(twin, keep, magnitude, round_to=round_to)
    if plan:
        prune_channels(twin, plan, fold_constants=False, allow_inexact=True, verify_atol=None)
    return model


def _bake_parametrizations(model: nn.Module) -> None:
    """Replace every parametrized tensor of a deep copy by its value, leaving the original model alone.

    (``parametrize.remove_parametrizations`` deletes the property from the module's class, which a deep copy
    shares with the original: the original would lose its parametrized tensors.)"""
    with torch.no_grad():
        for module in list(model.modules()):
            if not parametrize.is_parametrized(module):
                continue
            values = {name: plist() for name, plist in module.parametrizations.items()}
            del module._modules["parametrizations"]
            module.__class__ = type(module).__bases__[0]  # the class parametrize derived ParametrizedX from
            for name, value in values.items():
                module._parameters[name] = nn.Parameter(value.detach().clone(), requires_grad=False)


def solve_latency_target(keeps_for: Callable[[float], Keeps], estimate: Callable[[Keeps], float],
                         measure: Callable[[Keeps | None], float], target_ms: float | None = None, *,
                         target_speedup: float | None = None, tolerance: float = 0.05, max_iterations: int = 8,
                         max_fraction: float = 0.95, start: float | None = None
                         ) -> tuple[Keeps | None, LatencyTargetReport]:
    """Search the MACs fraction whose pruned network measures ``target_ms`` (or dense / ``target_speedup``).

    ``keeps_for(fraction)`` gives keep vectors (may raise ValueError when the fraction cannot be reached);
    ``estimate(keeps)`` the estimated ms; ``measure(keeps)`` the measured ms of the pruned network
    (``measure(None)``: the dense one). ``start`` is a first fraction to try (a previous solution).
    Returns (keeps or None for dense, report). See the module docstring.
    """
    if (target_ms is None) == (target_speedup is None):
        raise ValueError("give exactly one of target_ms and target_speedup")
    if not 0 < tolerance < 1 or max_iterations < 1 or not 0 < max_fraction < 1:
        raise ValueError(f"need 0 < tolerance < 1, max_iterations ≥ 1 and 0 < max_fraction < 1, got {tolerance}, "
                         f"{max_iterations}, {max_fraction}")
    started = time.perf_counter()
    dense_ms = float(measure(None))
    measured_s = time.perf_counter() - started
    dense_est = float(estimate({}))
    target = float(target_ms) if target_ms is not None else dense_ms / float(target_speedup)  # type: ignore[arg-type]
    report = LatencyTargetReport(target, dense_ms, dense_est, tolerance, 0.0, dense_est, dense_ms,
                                 measure_s=measured_s)
    if target >= dense_ms * (1 - tolerance):
        report.met, report.reason = True, "the dense network already meets the target"
        return None, report
    search = _Search(keeps_for, estimate, measure, target, tolerance, max_iterations, max_fraction, report)
    search.run(start)
    chosen = search.keeps(report.fraction) if report.fraction > 0 else None  # memoised: no allocation again
    return (chosen if chosen is not None else report_keeps(report, keeps_for)[0]), report


def report_keeps(report: LatencyTargetReport, keeps_for: Callable[[float], Keeps]) -> tuple[Keeps | None,
                                                                                           LatencyTargetReport]:
    """The keeps of the report's chosen fraction (None for dense)."""
    return (keeps_for(report.fraction) if report.fraction > 0 else None), report


def _signature(keep: Keeps) -> bytes:
    """The identity of a pruned network: its keep vectors, packed."""
    return b"|".join(f"{gid}:{np.asarray(k).dtype}:{len(k)}:".encode() + np.asarray(k).tobytes()
                     for gid, k in sorted(keep.items()))


class _Search:
    def __init__(self, keeps_for: Callable[[float], Keeps], estimate: Callable[[Keeps], float],
                 measure: Callable[[Keeps | None], float], target: float, tol: float, max_iterations: int,
                 max_fraction: float, report: LatencyTargetReport) -> None:
        self.keeps_for, self.estimate, self.measure = keeps_for, estimate, measure
        self.target, self.tol, self.max_iterations, self.hi_bound = target, tol, max_iterations, max_fraction
        self.max_fraction = max_fraction
        self.report = report
        self._keeps: dict[float, Keeps | None] = {}

    def keeps(self, f: float) -> Keeps | None:
        """Keeps for fraction ``f``, None where the budget cannot reach it (memoised)."""
        if f not in self._keeps:
            started = time.perf_counter()
            try:
                self._keeps[f] = self.keeps_for(f)
            except ValueError:
                self._keeps[f] = None
            self.report.allocate_s += time.perf_counter() - started
        return self._keeps[f]

    def _measure(self, k: Keeps) -> float:
        started = time.perf_counter()
        ms = float(self.measure(k))
        self.report.measure_s += time.perf_counter() - started
        return ms

    def fraction_for_estimate(self, est_target: float) -> float:
        """The smallest fraction whose estimate is at most ``est_target`` (bisection; the cap if none)."""
        lo, hi = 0.0, self.hi_bound
        for _ in range(_ESTIMATE_BISECT_STEPS):
            mid = (lo + hi) / 2
            k = self.keeps(mid)
            if k is None or self.estimate(k) <= est_target:
                hi = mid
            else:
                lo = mid
        return hi

    def run(self, start: float | None) -> None:
        r, target = self.report, self.target
        f: float | None = start if start is not None and 0 < start < self.hi_bound else self.fraction_for_estimate(
            r.dense_estimated_ms * target / r.dense_ms)
        slow: LatencyProbe | None = None  # the most pruned probe still too slow
        fast: LatencyProbe | None = None  # the least pruned probe fast enough
        measured: dict[bytes, LatencyProbe] = {}  # network (keep vectors) → its probe: each is measured once
        steps = 0
        while f is not None and len(r.probes) < self.max_iterations and steps < 8 * self.max_iterations:
            steps += 1
            k = self.keeps(f)
            if k is None:  # cannot reach f: the bound comes down
                self.hi_bound = f
                f = ((slow.fraction if slow else 0.0) + f) / 2
                continue
            key = _signature(k)
            same = measured.get(key)
            if same is not None:  # the same network as a probe before: move that end of the bracket, no timing
                probe = LatencyProbe(f, same.estimated_ms, same.measured_ms)
            else:
                probe = LatencyProbe(f, float(self.estimate(k)), self._measure(k))
                measured[key] = probe
                r.probes.append(probe)
                if abs(probe.measured_ms / target - 1) <= self.tol:
                    self._choose(probe, True, f"measured within {self.tol:.0%} of the target")
                    return
            if probe.measured_ms > target:
                slow = probe if slow is None or probe.fraction > slow.fraction else slow
            else:
                fast = probe if fast is None or probe.fraction < fast.fraction else fast
            f = self._next(probe, slow, fast)
        self._give_up(fast)

    def _next(self, probe: LatencyProbe, slow: LatencyProbe | None, fast: LatencyProbe | None) -> float | None:
        lo = slow.fraction if slow else 0.0
        hi = fast.fraction if fast else self.hi_bound
        if hi - lo < 1e-4:
            return None
        if slow is not None and fast is not None:  # secant in log ms between the bracket's ends
            a, b = math.log(slow.measured_ms), math.log(fast.measured_ms)
            f = lo + (math.log(self.target) - a) * (hi - lo) / (b - a) if b != a else (lo + hi) / 2
        else:  # the estimate, corrected by what the last probe measured
            f = self.fraction_for_estimate(self.target * probe.estimated_ms / probe.measured_ms)
        if not lo < f < hi:
            f = (lo + hi) / 2
        return f

    def _choose(self, probe: LatencyProbe, met: bool, reason: str) -> None:
        r = self.report
        r.fraction, r.estimated_ms, r.measured_ms, r.met, r.reason = (probe.fraction, probe.estimated_ms,
                                                                      probe.measured_ms, met, reason)

    def _give_up(self, fast: LatencyProbe | None) -> None:
        n = len(self.report.probes)
        if fast is not None:
            self._choose(fast, True, f"no network within {self.tol:.0%} of the target after {n} probes (the "
                                     "widths step past it); the least pruned one faster than the target")
            return
        best = min(self.report.probes, key=lambda p: p.measured_ms, default=None)
        if best is not None and best.measured_ms < self.report.dense_ms:
            bounded = self.hi_bound < self.max_fraction and best.fraction >= 0.9 * self.hi_bound
            hint = (f"the most pruning allowed (MACs fraction {self.hi_bound:.3g}: max_group_sparsity or "
                    "min widths) is not fast enough; lower the target or allow more pruning") if bounded else \
                "raise latency_max_iterations, or lower the target"
            self._choose(best, False, f"target missed after {n} probes: the fastest pruned network measured "
                                      f"{best.measured_ms:.4g} ms for {self.target:.4g} ms asked ({hint})")
            return
        r = self.report
        r.fraction, r.estimated_ms, r.measured_ms, r.met = 0.0, r.dense_estimated_ms, r.dense_ms, False
        r.reason = (f"target missed after {n} probes and no pruned network measured faster than the dense one: "
                    "the dense network is kept (the latency is not in the layers the budget can narrow)")
