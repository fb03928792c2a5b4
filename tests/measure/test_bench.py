"""measure.bench (trusted timing) and measure.network (a whole network timed on a grown batch)."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from sparsify.measure import Timing, benchmark, network_latency
from sparsify.measure.bench import _warm
from sparsify.measure.network import batched_inputs


def test_cpu_benchmark_quantiles_blocks_and_warmup() -> None:
    calls = []

    def fn() -> None:  # slow at first (cold), then a steady 1 ms
        calls.append(1)
        time.sleep(0.005 if len(calls) <= 3 else 0.001)

    t = benchmark(fn, iters=6, repeats=3, min_warmup=2, max_warmup=40)
    assert isinstance(t, Timing) and t.method == "perf_counter" and not t.l2_flushed
    assert len(t.times_ms) == 18 and len(t.block_medians_ms) == 3
    assert t.warmup_calls >= 10 and len(calls) == t.warmup_calls + 18
    assert t.p20 <= t.p50 <= t.p80 and 0.9 <= t.p50 < 4.0  # the cold calls are not timed
    assert 0 <= t.repeatability < 1
    d = t.as_dict()
    assert d["calls_timed"] == 18 and d["p50_ms"] == t.p50


def test_warmup_stops_once_the_time_settles() -> None:
    times = iter([9.0, 8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0, 1.0, *[1.0] * 10, *[1.0] * 100])
    assert _warm(lambda: next(times), 0, 100, 0.02) == (16, True)  # medians of the last two windows of 5 agree
    drifting = iter(float(i) for i in range(1, 1000))
    assert _warm(lambda: next(drifting), 0, 30, 0.02) == (30, False)  # never settles: stops at the cap


def test_repeatability_compares_block_medians() -> None:
    t = Timing((1.0, 1.0, 2.0, 2.0), (1.0, 2.0), "perf_counter", 0, True, False)
    assert t.p50 == 1.5 and t.repeatability == pytest.approx(1 / 3)


def test_benchmark_refuses_bad_settings() -> None:
    with pytest.raises(ValueError, match="iters"):
        benchmark(lambda: None, iters=0)
    with pytest.raises(ValueError, match="min_warmup"):
        benchmark(lambda: None, min_warmup=5, max_warmup=2)
    with pytest.raises(ValueError, match="settle_tol"):
        benchmark(lambda: None, settle_tol=0)


def test_batched_inputs_repeat_to_the_batch() -> None:
    x = torch.arange(2.0).view(2, 1, 1, 1).expand(2, 3, 2, 2).contiguous()
    (y, n) = batched_inputs([x, 7], 5, torch.device("cpu"))
    assert y.shape == (5, 3, 2, 2) and n == 7 and y.is_contiguous(memory_format=torch.channels_last)
    assert y[:, 0, 0, 0].tolist() == [0, 1, 0, 1, 0]
    with pytest.raises(ValueError, match="batch"):
        batched_inputs([x], 0, torch.device("cpu"))


def test_network_latency_runs_the_model_on_the_grown_batch() -> None:
    seen = []

    class Probe(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append((x.shape[0], torch.is_grad_enabled(), self.training))
            return x * 2

    t = network_latency(Probe().train(), [torch.randn(2, 3, 4, 4)], batch=8, iters=3, repeats=1, min_warmup=0,
                        max_warmup=0)
    assert t.method == "perf_counter" and len(t.times_ms) == 3 and t.warmup_calls == 0
    assert set(seen) == {(8, False, False)}


@pytest.mark.gpu
def test_cuda_benchmark_uses_a_graph_and_flushes_l2() -> None:
    x = torch.randn(256, 256, device="cuda")
    t = benchmark(lambda: x @ x, device="cuda", iters=10)
    assert t.method == "cuda_graph" and t.l2_flushed and t.p50 > 0 and t.fallback_reason == ""

    def syncs() -> None:  # a host sync cannot be captured: timed eagerly, with the reason
        (x @ x).sum().item()

    t = benchmark(syncs, device="cuda", iters=5)
    assert t.method == "cuda_events" and t.fallback_reason
    t = benchmark(lambda: x @ x, device="cuda", iters=5, cuda_graph=False, flush_l2=False)
    assert t.method == "cuda_events" and not t.l2_flushed


def test_cudnn_autotune_sets_the_flag_inside_and_restores_it_even_on_error() -> None:
    from sparsify.measure import cudnn_autotune

    before = torch.backends.cudnn.benchmark
    try:
        torch.backends.cudnn.benchmark = True
        with cudnn_autotune(False):
            assert torch.backends.cudnn.benchmark is False
        assert torch.backends.cudnn.benchmark is True
        torch.backends.cudnn.benchmark = False
        with pytest.raises(RuntimeError, match="inside"), cudnn_autotune(True):
            assert torch.backends.cudnn.benchmark is True
            raise RuntimeError("inside")
        assert torch.backends.cudnn.benchmark is False
    finally:
        torch.backends.cudnn.benchmark = before
