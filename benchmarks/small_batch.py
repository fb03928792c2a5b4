"""Why a pruned network can be slower than dense at small batches (issue #19: "never slower than dense").

For each model: dense and ``ours+round`` at 2× fewer MACs with several ``round_to`` multiples, deployed as the
speed benchmark deploys them (``--mode``, default cuda-graph+bf16), timed at every ``--batches`` size, and at
the small sizes profiled kernel by kernel (eager forward of the same deployed network): the kernels whose
time grew against dense say whether the loss is cuDNN's choice at odd widths, extra kernels, or copies.

    python -m benchmarks.small_batch --models mobilenet_v2 resnet50 --out small_batch.json
    python -m benchmarks.small_batch --device cpu --models resnet18 --size 64 --batches 1 2 --iters 3   # smoke
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from benchmarks.speed import parser as speed_parser
from benchmarks.speed_lib.arms import prune_ours
from benchmarks.speed_lib.deployment import MODES, Deployed
from benchmarks.speed_lib.models import build, unaligned
from sparsify.measure.breakdown import time_by_kind
from sparsify.measure.cudnn import cudnn_autotune


def _kernels(run: Any, device: torch.device) -> dict[str, dict[str, float]]:
    """{kernel name: {"ms", "calls"}} per forward (all kernels, not only the top ones)."""
    _, top = time_by_kind(run, device=device, iters=5, warmup=2, top=10_000)
    return {t["name"]: {"ms": t["ms"], "calls": t["calls"]} for t in top}


def _grown(dense: dict[str, dict[str, float]], pruned: dict[str, dict[str, float]], top: int = 8
           ) -> list[dict[str, Any]]:
    """Kernels by how much more time per forward they take in the pruned network than in dense."""
    names = set(dense) | set(pruned)
    delta = {n: pruned.get(n, {}).get("ms", 0.0) - dense.get(n, {}).get("ms", 0.0) for n in names}
    return [{"name": n, "delta_ms": round(delta[n], 4), "dense_calls": dense.get(n, {}).get("calls", 0),
             "pruned_calls": pruned.get(n, {}).get("calls", 0)}
            for n in sorted(names, key=delta.__getitem__, reverse=True)[:top]]


def run_model(name: str, args: argparse.Namespace, console: Console) -> dict[str, Any]:
    device = torch.device(args.device)
    dense = build(name, args.size)
    x = torch.randn(2, 3, args.size, args.size)
    nets = {"dense": dense}
    for r in args.round_to_list:
        nets[f"round{r}"], _ = prune_ours(dense, x, args.ratio, r, 2, "uniform")
    mode = MODES[args.mode]
    out: dict[str, Any] = {}
    profiles: dict[int, dict[str, Any]] = defaultdict(dict)
    for net_name, model in nets.items():
        deployed = Deployed(model, x, mode, args)
        rec: dict[str, Any] = {"unaligned_8": unaligned(model, 8), "ms": {}}
        for b in args.batches:
            rec["ms"][str(b)] = round(deployed.time(b)["ms"], 4)
            if b in args.profile_batches:
                profiles[b][net_name] = _kernels(deployed.runner(b, deployed.eager), device)
                rec.setdefault("kernels", {})[str(b)] = sum(k["calls"] for k in profiles[b][net_name].values())
                rec.setdefault("kernel_ms", {})[str(b)] = round(sum(k["ms"] for k in profiles[b][net_name].values()), 4)
        out[net_name] = rec
        del deployed
    for b, by_net in profiles.items():
        for net_name, kernels in by_net.items():
            if net_name != "dense":
                out[net_name].setdefault("grown", {})[str(b)] = _grown(by_net["dense"], kernels)
    table = Table(title=f"{name}: ms per forward ({args.mode}); kernels / kernel-ms at profiled batches")
    table.add_column("network")
    for b in args.batches:
        table.add_column(f"b{b} ms (× dense)", justify="right")
    table.add_column("kernels", justify="right")
    for net_name, rec in out.items():
        dense_ms = out["dense"]["ms"]
        cells = [f"{rec['ms'][str(b)]:.3f} ({dense_ms[str(b)] / rec['ms'][str(b)]:.2f}×)" for b in args.batches]
        table.add_row(net_name, *cells, " ".join(f"{b}:{n}" for b, n in rec.get("kernels", {}).items()))
    console.print(table)
    for net_name, rec in out.items():
        for b, grown in rec.get("grown", {}).items():
            console.print(f"{name} {net_name} batch {b}: kernels that grew most vs dense")
            for g in grown[:5]:
                calls = f"{g['dense_calls']}→{g['pruned_calls']}"
                console.print(f"  {g['delta_ms']:+.4f} ms  calls {calls}  {g['name'][:100]}")
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--models", nargs="+", default=["mobilenet_v2", "resnet50"])
    ap.add_argument("--ratio", type=float, default=2.0, help="MACs reduction of the pruned networks")
    ap.add_argument("--round-to-list", nargs="+", type=int, default=[8, 16, 32])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 16, 256])
    ap.add_argument("--profile-batches", nargs="*", type=int, default=[1, 16])
    ap.add_argument("--mode", choices=sorted(MODES), default="cuda-graph+bf16")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--no-cudnn-benchmark", action="store_true", help="cuDNN's heuristics instead of its autotuner")
    ap.add_argument("--out", type=Path)
    args, rest = ap.parse_known_args(argv)
    # the speed benchmark's deployment settings (dtype, warm-up, stem) with its own defaults, as its h200 preset
    speed = speed_parser().parse_args(["--device", args.device, "--iters", str(args.iters), "--s2d-stem", *rest])
    speed.dtype = speed.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")
    speed.warmup = speed.warmup if speed.warmup is not None else min(10, args.iters)
    speed.max_warmup = speed.max_warmup if speed.max_warmup is not None else 60
    merged = argparse.Namespace(**{**vars(speed), **vars(args)})
    console = Console(width=170)
    with cudnn_autotune(not args.no_cudnn_benchmark):
        models = {m: run_model(m, merged, console) for m in args.models}
    result = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
              "torch": torch.__version__, "cudnn": torch.backends.cudnn.version(),
              "settings": {k: v for k, v in vars(args).items() if k != "out"}, "models": models}
    if args.out:
        args.out.write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
