"""Timing on the device a model runs on: CUDA events on GPUs, ``perf_counter`` elsewhere; autocast helpers."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["autocast_context", "cuda_autocast_dtype", "measure_latency"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def cuda_autocast_dtype() -> torch.dtype | None:
    """The CUDA autocast dtype while autocast is on for CUDA, else None."""
    try:
        on = torch.is_autocast_enabled("cuda")
    except TypeError:  # torch without the device argument
        on = torch.is_autocast_enabled()
    if not on:
        return None
    get = getattr(torch, "get_autocast_dtype", None)
    return get("cuda") if get is not None else torch.get_autocast_gpu_dtype()


def autocast_context(device: torch.device | str, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` to ``dtype`` on ``device`` (a null context when ``dtype`` is None)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def measure_latency(fn: Callable[[], Any], *, iters: int = 50, warmup: int = 10,
                    device: torch.device | str = "cpu") -> list[float]:
    """Milliseconds per call of ``fn`` for ``iters`` calls after ``warmup`` calls.

    On CUDA each call is timed with a pair of CUDA events (the GPU time between them, no host sync
    inside the loop); elsewhere with ``time.perf_counter``. Take the median of the result.
    """
    if iters < 1 or warmup < 0:
        raise ValueError(f"iters must be ≥ 1 and warmup ≥ 0, got iters={iters}, warmup={warmup}")
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        return [start.elapsed_time(end) for start, end in events]
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return times
