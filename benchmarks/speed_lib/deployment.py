"""Deployment modes and the timing of a deployed network.

Every network (dense and pruned) is deployed with ``sparsify.deploy`` (BN folded, channels_last,
``--s2d-stem`` as given) and then run in one of these modes:

* ``eager``: conv+bias+ReLU (+add) fused into cuDNN kernels, bf16 autocast;
* ``eager+bf16``: the same with parameters cast to bf16 (``--cast-params``: no per-call weight casts);
* ``cuda-graph`` / ``cuda-graph+bf16``: the fused eager forward captured and replayed as a CUDA graph;
* ``compile`` / ``max-autotune``: ``torch.compile`` (mode ``default`` / ``max-autotune``) of the folded,
  unfused network with bf16 parameters (inductor fuses by itself).

On the CPU the CUDA-graph modes time eager calls (the timing says which method it used). Timing is
``sparsify.measure.bench.benchmark`` (warm-up until settled, CUDA graph where asked, L2 flushed, p20/p50/p80)
when the library has it, else the median of ``sparsify.measure.measure_latency``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from benchmarks.speed_lib.arms import DTYPES
from sparsify.deploy import deploy
from sparsify.measure import autocast_context, measure_latency

try:  # trusted timing (issue #19); older trees only have measure_latency
    from sparsify.measure.bench import benchmark
except ImportError:  # pragma: no cover - depends on the library version
    benchmark = None


@dataclass(frozen=True)
class Mode:
    name: str
    compile: str | None = None  # torch.compile mode, None: eager
    cuda_graph: bool = False
    cast_params: bool = False

    @property
    def compiled(self) -> bool:
        return self.compile is not None


MODES = {m.name: m for m in (
    Mode("eager"), Mode("eager+bf16", cast_params=True), Mode("cuda-graph", cuda_graph=True),
    Mode("cuda-graph+bf16", cuda_graph=True, cast_params=True), Mode("compile", compile="default", cast_params=True),
    Mode("max-autotune", compile="max-autotune", cast_params=True))}


class Deployed:
    """A network deployed in one mode on ``args.device``; ``time(batch)`` times its forward at a batch size."""

    def __init__(self, model: nn.Module, example: torch.Tensor, mode: Mode, args: argparse.Namespace) -> None:
        start = time.perf_counter()
        self.mode, self.args = mode, args
        self.device = torch.device(args.device)
        self.dtype = DTYPES[args.dtype]
        cast = self.dtype if mode.cast_params else None
        out = deploy(model.to(self.device), example.to(self.device), channels_last=True, compile=False, dtype=cast,
                     space_to_depth_stem=args.s2d_stem, fuse_activations=not args.no_fuse and not mode.compiled)
        out.requires_grad_(False)  # inference: no autocast weight cache to keep alive across CUDA-graph replays
        self.eager = out
        self.module = torch.compile(out, mode=mode.compile) if mode.compiled else out
        self.shape = tuple(example.shape[1:])
        self.deploy_s = time.perf_counter() - start

    def inputs(self, batch: int) -> torch.Tensor:
        x = torch.randn(batch, *self.shape, device=self.device).contiguous(memory_format=torch.channels_last)
        return x.to(self.dtype) if self.mode.cast_params and self.dtype is not None else x

    def runner(self, batch: int, module: nn.Module | None = None) -> Callable[[], None]:
        x, model = self.inputs(batch), module or self.module

        def run() -> None:
            with torch.no_grad(), autocast_context(self.device, self.dtype):
                model(x)

        return run

    def time(self, batch: int) -> dict[str, Any]:
        """One separately built timing at ``batch``: ``{"ms": p50, "p20_ms", "p80_ms", "method", "wall_s", ...}``."""
        start, args = time.perf_counter(), self.args
        run = self.runner(batch)
        if benchmark is not None:
            t = benchmark(run, device=self.device, iters=args.iters, repeats=2, min_warmup=min(args.warmup, 10),
                          max_warmup=max(args.warmup, args.max_warmup), cuda_graph=self.mode.cuda_graph)
            out = {"ms": t.p50, **{k: v for k, v in t.as_dict().items() if k != "block_medians_ms"}}
        else:  # pragma: no cover - older library
            times = measure_latency(run, iters=args.iters, warmup=args.warmup + (3 if self.mode.compiled else 0),
                                    device=self.device)
            out = {"ms": statistics.median(times), "method": "measure_latency"}
        out["wall_s"] = round(time.perf_counter() - start, 2)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return out


def measure_fn(example: torch.Tensor, mode: Mode, batch: int, args: argparse.Namespace
               ) -> Callable[[nn.Module], float]:
    """``fn(model) -> ms``: deploy a (pruned copy of a) network in ``mode`` and time it at ``batch`` (the
    ``measure`` a latency target iterates with)."""
    return lambda model: float(Deployed(model, example, mode, args).time(batch)["ms"])


def pick_mode(dense_timings: dict[str, dict[str, Any]], networks: int, seconds_left: float
              ) -> tuple[str, str]:
    """The fastest mode on the dense network among those whose set-up (deploy + compile + timing, measured on
    dense) fits ``networks`` more networks in ``seconds_left``; returns (mode, why)."""
    ok = {m: t for m, t in dense_timings.items() if "ms" in t}
    if not ok:
        raise RuntimeError("no deployment mode could be timed on the dense network")
    fastest = min(ok, key=lambda m: ok[m]["ms"])
    fits = {m: t for m, t in ok.items() if t["setup_s"] * networks <= seconds_left}
    if fastest in fits:
        return fastest, f"fastest on dense ({ok[fastest]['ms']:.3f} ms)"
    pick = min(fits or ok, key=lambda m: (fits or ok)[m]["ms"])
    return pick, (f"{fastest} was fastest on dense ({ok[fastest]['ms']:.3f} ms) but its set-up "
                  f"({ok[fastest]['setup_s']:.0f} s a network × {networks}) does not fit the {seconds_left:.0f} s "
                  f"left; {pick}: {ok[pick]['ms']:.3f} ms")
