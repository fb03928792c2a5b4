"""Where the time of a forward pass goes: device kernel time (CUDA) or op time (CPU) grouped by kind.

Pruning removes MACs, but a network's latency also has parts that do not scale with MACs: element-wise
kernels (activations, residual additions), normalisations, layout copies and casts. ``time_by_kind``
profiles a callable with ``torch.profiler`` and sums, per call, the time of every kernel (CUDA) or
every ATen op's self time (CPU) into kinds, so a benchmark can say why a pruned model is not as much
faster as its MACs say:

    kinds, top = time_by_kind(lambda: model(x), device="cuda")
    kinds  # {"conv": 7.1, "elementwise": 5.3, "copy/cast": 0.4, ...} ms per call

Kinds come from the kernel or op name (``KIND_PATTERNS``, first match wins); names that match none
count as ``other``. The split is a diagnostic, not an exact accounting: kernel names differ between
libraries and versions.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

__all__ = ["KIND_PATTERNS", "kernel_kind", "time_by_kind"]

# (kind, regex on the lower-cased kernel or op name); the first match wins: inductor's kernels first (a
# "triton_poi_fused_add_convolution_relu" is the point-wise epilogue, not the conv), layout transforms before conv
# (cuDNN names them), conv before matmul (its kernels are "implicit_gemm"s), copy/cast before elementwise
# (a cast is an elementwise kernel).
KIND_PATTERNS: tuple[tuple[str, str], ...] = (
    ("elementwise", r"triton_poi"),  # inductor's fused point-wise kernels (named after the ops they fuse)
    ("norm/reduce", r"triton_red|triton_per"),
    ("copy/cast", r"nchwtonhwc|nhwctonchw|memcpy|memset"),
    ("attention", r"flash|fmha|attention|attn"),
    ("conv", r"conv|fprop|dgrad|wgrad|cudnn|implicit|winograd|depthwise"),
    ("matmul", r"gemm|nvjet|cutlass|cublas|addmm|\bmm\b|aten::mm|matmul|aten::linear|bmm"),
    ("norm/reduce", r"norm|reduce|softmax|triton_red|triton_per|welford|mean|sum"),
    ("pool", r"pool"),
    ("copy/cast", r"copy|transpose|_to_copy|aten::to\b|contiguous|(?<!no)cast|cat"),
    ("elementwise", r"elementwise|vectorized|unrolled|triton_poi|relu|gelu|silu|hardtanh|sigmoid|tanh|add|mul|clamp"),
)
_COMPILED = [(kind, re.compile(rx)) for kind, rx in KIND_PATTERNS]


def kernel_kind(name: str) -> str:
    """The kind of a kernel or op from its name (``other`` when no pattern matches)."""
    low = name.lower()
    return next((kind for kind, rx in _COMPILED if rx.search(low)), "other")


def time_by_kind(fn: Callable[[], Any], *, device: torch.device | str = "cpu", iters: int = 5, warmup: int = 2,
                 top: int = 10) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Milliseconds per call of ``fn`` by kind, and its ``top`` most expensive kernels (ops on the CPU).

    On CUDA every device kernel of the profiled calls counts (its duration); elsewhere the self time of
    every ATen op. Returns ``({kind: ms per call}, [{"name", "kind", "ms", "calls"} per call, largest first])``.
    """
    if iters < 1 or warmup < 0:
        raise ValueError(f"iters must be ≥ 1 and warmup ≥ 0, got iters={iters}, warmup={warmup}")
    device = torch.device(device)
    cuda = device.type == "cuda"
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(iters):
            fn()
        if cuda:
            torch.cuda.synchronize(device)
    us: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    for event in prof.events():
        on_device = event.device_type == torch.autograd.DeviceType.CUDA
        if cuda and on_device:
            us[event.name] += event.time_range.elapsed_us()
        elif not cuda and not on_device and event.name.startswith("aten::"):
            us[event.name] += event.self_cpu_time_total
        else:
            continue
        calls[event.name] += 1
    kinds: dict[str, float] = defaultdict(float)
    for name, t in us.items():
        kinds[kernel_kind(name)] += t / iters / 1e3
    ranked = sorted(us, key=us.__getitem__, reverse=True)[:top]
    return (dict(sorted(kinds.items(), key=lambda kv: -kv[1])),
            [{"name": n[:120], "kind": kernel_kind(n), "ms": us[n] / iters / 1e3, "calls": calls[n] // iters}
             for n in ranked])
