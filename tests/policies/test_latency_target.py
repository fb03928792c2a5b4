"""Latency targets (policies/allocation/latency_target, GMPConfig(target_speedup=/target_ms=)): the search
converges on a deterministic fake measurement, stops with a clear report, never returns a network slower
than dense, refuses contradictory settings, and the pruned network stays exact."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from sparsify import FilterNormConfig, GMPConfig, Sparsifier, SparsifierConfig
from sparsify.errors import SparsifyError
from sparsify.measure.latency_model import LatencyModel
from sparsify.policies.allocation.latency_target import pruned_copy, solve_latency_target
from sparsify.testing.oracle import _outputs
from tests.policies.test_latency_budget import STEP, expensive_hi_res, make


def conv_ms(model: nn.Module) -> float:
    """A deterministic 'measured' latency from the widths: a fixed 0.2 ms plus a cost per conv weight
    (unlike the estimate, which charges hi-resolution layers 10× per MAC, so the loop must correct)."""
    return 0.2 + sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Conv2d)) * 1e-4


def sparsifier(model: nn.Module, x: torch.Tensor, measure=conv_ms, **policy) -> Sparsifier:
    cfg = SparsifierConfig(adapter=FilterNormConfig(), round_to=STEP,
                           policy=GMPConfig(unit="macs", budget="latency", end_step=1, **policy))
    return Sparsifier(model, x, config=cfg, latency_model=lambda g: LatencyModel(
        g, step=STEP, latency_fn=expensive_hi_res, measure=measure))


@pytest.mark.parametrize("speedup", [1.3, 1.5, 1.6])
def test_latency_target_converges_and_stays_exact(speedup: float) -> None:
    model, x = make(torch.float64)
    sp = sparsifier(model, x, target_speedup=speedup)
    dense_ms = conv_ms(model)
    sp.step()
    soft = _outputs(model, x)
    result = sp.prune()
    report = sp.policy.latency_report
    assert report is not None and report.met, report.reason
    assert result.latency is report  # PruneResult carries the estimated and measured latency
    if speedup == 1.6:  # this toy net's widths (multiples of 8) step from 1.50× to 1.69×: the faster one
        assert "step past" in report.reason and report.speedup > speedup and len(report.probes) <= 4
    else:
        assert abs(report.speedup / speedup - 1) <= 0.05, report.reason
    assert report.dense_ms == pytest.approx(dense_ms)
    assert conv_ms(model) == pytest.approx(report.measured_ms)  # the pruned model is the one measured
    assert report.estimated_ms < report.dense_estimated_ms and report.probes
    assert report.allocate_s > 0 and report.measure_s > 0  # where the search's time went
    assert result.macs_after < result.macs_before
    for a, b in zip(soft, _outputs(model, x), strict=True):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=0)


def test_target_ms_and_max_iterations_report() -> None:
    model, x = make()
    target = conv_ms(model) / 1.5
    sp = sparsifier(model, x, target_ms=target, latency_tolerance=1e-4, latency_max_iterations=1)
    with pytest.warns(UserWarning, match="raise latency_max_iterations"):
        sp.prune()
    report = sp.policy.latency_report
    assert len(report.probes) == 1 and report.target_ms == pytest.approx(target)
    assert "after 1 probes" in report.reason
    assert report.measured_ms == pytest.approx(conv_ms(model))
    assert report.measured_ms < report.dense_ms


def test_never_slower_than_dense() -> None:
    model, x = make()
    dense_convs = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Conv2d))

    def pruning_hurts(m: nn.Module) -> float:  # any narrower network is slower (widths off fast kernels)
        n = sum(c.weight.numel() for c in m.modules() if isinstance(c, nn.Conv2d))
        return 1.0 if n == dense_convs else 2.0

    sp = sparsifier(model, x, measure=pruning_hurts, target_speedup=2.0, latency_max_iterations=4)
    widths = [m.weight.shape for m in model.modules() if isinstance(m, nn.Conv2d)]
    with pytest.warns(UserWarning, match="latency target not met: .*dense network is kept"):
        sp.prune()  # a missed target is said, not only recorded
    report = sp.policy.latency_report
    assert not report.met and "dense network is kept" in report.reason and report.fraction == 0
    assert [m.weight.shape for m in model.modules() if isinstance(m, nn.Conv2d)] == widths
    assert len(report.probes) == 4 and all(p.measured_ms == 2.0 for p in report.probes)


def test_solver_on_a_synthetic_curve() -> None:
    """Measured ms is convex in the fraction, the estimate linear: the corrected secant still lands."""
    keeps_for = lambda f: {0: np.asarray([f])}  # noqa: E731
    estimate = lambda k: 10.0 * (1 - float(k[0][0])) if k else 10.0  # noqa: E731
    measure = lambda k: 1.0 + 9.0 * (1 - float(k[0][0])) ** 2 if k else 10.0  # noqa: E731
    keeps, report = solve_latency_target(keeps_for, estimate, measure, target_speedup=3.0, tolerance=0.01)
    assert report.met and abs(report.speedup / 3.0 - 1) <= 0.01 and len(report.probes) <= 6
    assert keeps is not None and float(keeps[0][0]) == pytest.approx(report.fraction)
    # the dense network already meets a slack target: nothing is pruned
    keeps, report = solve_latency_target(keeps_for, estimate, measure, target_ms=20.0)
    assert keeps is None and report.met and report.probes == []
    # an unreachable fraction (the budget raises) lowers the bound instead of failing
    def capped(f: float) -> dict:
        if f > 0.5:
            raise ValueError("short of the target")
        return keeps_for(f)
    _, report = solve_latency_target(capped, estimate, measure, target_speedup=100.0, max_iterations=6)
    assert not report.met and report.fraction <= 0.5 and report.measured_ms < report.dense_ms
    assert "the most pruning allowed" in report.reason, report.reason  # not "raise latency_max_iterations"
    assert math.isfinite(report.estimated_speedup)


@pytest.mark.parametrize(("policy", "match"), [
    (dict(target_speedup=1.0), "target_speedup must be > 1"),
    (dict(target_speedup=0.5), "target_speedup must be > 1"),
    (dict(target_speedup=2.0, target_ms=1.0), "contradict"),
])
def test_contradictory_settings_are_refused(policy: dict, match: str) -> None:
    with pytest.raises(SparsifyError, match=match):
        GMPConfig(unit="macs", budget="latency", **policy)


def test_latency_target_needs_the_latency_budget_and_model() -> None:
    with pytest.raises(SparsifyError, match="needs budget='latency'"):
        GMPConfig(unit="macs", budget="uniform", target_speedup=2.0)
    model, x = make()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = SparsifierConfig(adapter=FilterNormConfig(), policy=GMPConfig(unit="macs", budget="latency",
                                                                         target_speedup=2.0))
    with pytest.raises(SparsifyError, match="latency model"):
        Sparsifier(model, x, config=cfg)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not any(hasattr(m, "parametrizations") for m in model.modules())


def test_pruned_copy_leaves_the_model_alone() -> None:
    model, x = make()
    sp = sparsifier(model, x, target_speedup=1.5)
    masked = [m for m in model.modules() if hasattr(m, "parametrizations")]
    assert masked
    keep = {g.id: np.arange(g.width) >= g.width // 2 for g in sp.groups}
    mags = {g.id: g.magnitude() for g in sp.groups}
    copy_ = pruned_copy(sp.graph, keep, mags.__getitem__, STEP)
    assert conv_ms(copy_) < conv_ms(model)
    model(x)  # the original keeps its masks (a shared parametrized class must not lose its properties)
    assert all(hasattr(m, "parametrizations") for m in masked)
    assert not any(hasattr(m, "parametrizations") for m in copy_.modules())
