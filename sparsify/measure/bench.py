"""Timing that can be trusted: warm clocks, CUDA graphs, a flushed L2 cache, quantiles and a repeatability figure.

``benchmark(fn, device=...)`` calls ``fn`` until its time settles (warm clocks, caches, cuDNN's algorithm
choice), then times ``repeats`` blocks of ``iters`` calls. On CUDA it captures ``fn`` in a CUDA graph when it
can (launch overhead gone; falls back to eager calls and says why) and, before every timed call, writes a
buffer twice the size of the L2 cache so that no call finds the previous one's weights there; each call is
timed by a pair of CUDA events. Elsewhere ``time.perf_counter`` times eager calls. The result keeps every
time and gives p20/p50/p80 and ``repeatability``: the largest relative distance of a block's median from
the overall median (0.02: two blocks agree within about 2 %).

    t = benchmark(lambda: model(x), device="cuda")
    t.p50, t.p20, t.p80, t.repeatability, t.method   # ms, ms, ms, fraction, "cuda_graph"
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

__all__ = ["Timing", "benchmark"]


@dataclass(frozen=True)
class Timing:
    """Milliseconds per call of one benchmarked callable, and how they were measured."""

    times_ms: tuple[float, ...]  # every timed call, block after block
    block_medians_ms: tuple[float, ...]  # median of each block of calls
    method: str  # "cuda_graph", "cuda_events" (eager calls on CUDA) or "perf_counter"
    warmup_calls: int  # calls made before timing (until the time settled, or the cap)
    settled: bool  # whether the warm-up time settled before the cap
    l2_flushed: bool
    fallback_reason: str = ""  # why a CUDA graph was not used, when it was asked for
    extra: dict[str, Any] = field(default_factory=dict)

    def quantile(self, q: float) -> float:
        return float(np.quantile(np.asarray(self.times_ms), q))

    @property
    def p20(self) -> float:
        return self.quantile(0.2)

    @property
    def p50(self) -> float:
        return self.quantile(0.5)

    @property
    def p80(self) -> float:
        return self.quantile(0.8)

    @property
    def repeatability(self) -> float:
        """Largest relative distance of a block median from the overall median (0: blocks agree)."""
        med = self.p50
        return max(abs(b - med) for b in self.block_medians_ms) / med if med > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        """Plain data for reports and JSON."""
        return {"p20_ms": self.p20, "p50_ms": self.p50, "p80_ms": self.p80, "repeatability": self.repeatability,
                "method": self.method, "warmup_calls": self.warmup_calls, "settled": self.settled,
                "l2_flushed": self.l2_flushed, "fallback_reason": self.fallback_reason,
                "calls_timed": len(self.times_ms), "block_medians_ms": list(self.block_medians_ms)}


def _check(iters: int, repeats: int, min_warmup: int, max_warmup: int, settle_tol: float) -> None:
    if iters < 1 or repeats < 1:
        raise ValueError(f"iters and repeats must be ≥ 1, got iters={iters}, repeats={repeats}")
    if min_warmup < 0 or max_warmup < min_warmup:
        raise ValueError(f"need 0 ≤ min_warmup ≤ max_warmup, got {min_warmup} and {max_warmup}")
    if not settle_tol > 0:
        raise ValueError(f"settle_tol must be > 0 (e.g. 0.02), got {settle_tol}")


def _warm(call: Callable[[], float], min_warmup: int, max_warmup: int, settle_tol: float, window: int = 5
          ) -> tuple[int, bool]:
    """Call until the median of the last ``window`` calls moves by less than ``settle_tol`` (relative) from
    the window before (and at least ``min_warmup`` calls); returns (calls made, settled)."""
    times: list[float] = []
    while len(times) < max_warmup:
        times.append(call())
        n = len(times)
        if n >= max(min_warmup, 2 * window):
            now, before = statistics.median(times[-window:]), statistics.median(times[-2 * window:-window])
            if before > 0 and abs(now - before) / before < settle_tol:
                return n, True
    return len(times), max_warmup == 0


def _l2_buffer(device: torch.device) -> torch.Tensor | None:
    try:
        size = int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0))
    except (AssertionError, RuntimeError):
        return None
    return torch.empty(2 * max(size, 1 << 20), dtype=torch.int8, device=device)


def _capture(fn: Callable[[], Any], device: torch.device) -> tuple[Callable[[], Any] | None, str]:
    """A CUDA graph replaying ``fn``, or (None, why it could not be captured)."""
    try:
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(3):  # warm-up on a side stream, as capture requires
                fn()
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        torch.cuda.synchronize(device)
        return graph.replay, ""
    except Exception as exc:  # any capture failure means: time it eagerly
        with contextlib.suppress(Exception):  # an invalidated capture may report again here
            torch.cuda.synchronize(device)
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]


def benchmark(fn: Callable[[], Any], *, device: torch.device | str = "cpu", iters: int = 30, repeats: int = 2,
              min_warmup: int = 10, max_warmup: int = 200, settle_tol: float = 0.02, cuda_graph: bool = True,
              flush_l2: bool = True) -> Timing:
    """Time ``fn`` (see the module docstring): warm-up until settled, then ``repeats`` blocks of ``iters`` calls.

    ``fn`` must not synchronize with the host for a CUDA graph (else it is timed eagerly, the reason in
    ``Timing.fallback_reason``). Everything ``fn`` allocates outside its first calls must be static for
    a graph replay to be valid: pass a function of fixed inputs.
    """
    _check(iters, repeats, min_warmup, max_warmup, settle_tol)
    device = torch.device(device)
    if device.type != "cuda":
        def timed() -> float:
            start = time.perf_counter()
            fn()
            return (time.perf_counter() - start) * 1e3

        calls, settled = _warm(timed, min_warmup, max_warmup, settle_tol)
        blocks = [[timed() for _ in range(iters)] for _ in range(repeats)]
        return _result(blocks, "perf_counter", calls, settled, False, "")
    run, reason, method = fn, "", "cuda_events"
    if cuda_graph:
        replay, reason = _capture(fn, device)
        if replay is not None:
            run, method = replay, "cuda_graph"
    buffer = _l2_buffer(device) if flush_l2 else None

    def timed_cuda() -> float:
        if buffer is not None:
            buffer.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        return float(start.elapsed_time(end))

    calls, settled = _warm(timed_cuda, min_warmup, max_warmup, settle_tol)
    blocks = [[timed_cuda() for _ in range(iters)] for _ in range(repeats)]
    return _result(blocks, method, calls, settled, buffer is not None, reason)


def _result(blocks: list[list[float]], method: str, calls: int, settled: bool, flushed: bool, reason: str) -> Timing:
    return Timing(tuple(t for b in blocks for t in b), tuple(float(statistics.median(b)) for b in blocks), method,
                  calls, settled, flushed, reason)
