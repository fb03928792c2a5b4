"""Are pruned models really faster? Dense vs pruned inference latency, sparsify against Torch-Pruning (issue #19).

Per model (ResNet-50, MobileNetV2, ViT-B/16; torchvision, random weights: latency does not depend on them):

* **arms** at each MACs-reduction target (dense MACs / pruned MACs): ``ours+round`` (GMP, exact MACs, uniform
  budget, ``round_to``), ``ours+latency`` (the latency budget at the same MACs), ``tp`` and ``tp+round``
  (Torch-Pruning, the same MACs), ``ours`` (no rounding) on request; and the **latency targets**
  ``ours@1.5x``/``@2x``/``@3x``: ``GMPConfig(budget="latency", target_speedup=t)``, which measures whole pruned
  networks in the benchmark's deployment and iterates. ViT with ``--vit-heads``: ``ours+latency+heads`` and
  heads+MLP latency targets. See ``benchmarks.speed_lib.arms`` and ``.tp_arm``.
* **deployment** (``benchmarks.speed_lib.deployment``): dense timed in every ``--modes`` mode (eager fused,
  bf16 parameters, CUDA graphs, torch.compile default / max-autotune); the fastest whose set-up fits the time
  left is picked for every arm of that model (fairness), the choice and every mode's time in the JSON.
* **timing**: ``sparsify.measure.bench.benchmark`` (warm-up until settled, CUDA graphs where the mode says, L2
  flushed, p20/p50/p80); ``--repeat`` separately built timings per network, the spread of realised ratios
  ((max − min) / mean) in the table; batch ``--batch`` (CNNs) / ``--vit-batch``, bf16, plus
  ``--small-batches`` (1 and 16) of the same pruned networks, timed with cuDNN's heuristics (its autotuner picks
  slower, unrepeatable kernels there: ``sparsify.measure.cudnn``).
* **diagnostics** (``--profile``): device time by kernel kind, and every layer's latency-model time alone vs
  inside the network (``benchmarks.speed_lib.diagnostics``).

``realised`` = speedup / MACs reduction (1.0: latency falls as much as the MACs). MACs:
``sparsify.graph.cost.module_macs`` plus ``nn.MultiheadAttention``'s projections and products.
``--time-budget`` skips work that no longer fits (the row says so); the JSON is written after every model.

    python -m benchmarks.speed --preset h200 --out $OUT/speed.json          # one H200, about 9 minutes
    python -m benchmarks.speed --device cpu --models resnet18 --batch 2 --size 64 --iters 3   # smoke test
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from benchmarks.speed_lib.deployment import MODES
from benchmarks.speed_lib.models import tv
from benchmarks.speed_lib.report import markdown, table
from benchmarks.speed_lib.runner import Clock, bench_model
from benchmarks.speed_lib.tp_arm import tp_version
from sparsify.measure import width_latency_table

# One H200 (docs/results/speed.md): the models, arms and targets — one model per ≤ 10-minute command
# (`--preset h200 --models resnet50`: the three together skipped arms over --time-budget) — four
# deployment modes picked from, torch.compile timed on dense only (its ~30-60 s compile per network does not
# fit ~25 networks a model; max-autotune, minutes a network, is left out).
PRESETS: dict[str, list[str]] = {
    "h200": ["--models", "resnet50", "mobilenet_v2", "vit_b_16", "--vit-heads", "--max-group-sparsity", "0.8",
             "--heads-max-group-sparsity", "0.5", "--target-max-group-sparsity", "0.8",
             "--round-to", "8", "--latency-points", "3", "--s2d-stem", "--profile", "--repeat", "2",
             "--small-batches", "1", "16", "--iters", "20", "--max-warmup", "60", "--tp-steps", "10", "--refine", "2",
             "--modes", "eager", "eager+bf16", "cuda-graph", "cuda-graph+bf16", "--reference-modes", "compile",
             "--latency-iterations", "4", "--depth", "--small-batch-guard", "--time-budget", "500"],
}


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), help="a fixed set of flags (later flags override them)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--models", nargs="+", default=["resnet50", "mobilenet_v2"])
    ap.add_argument("--vit", action="store_true", help="also ViT-B/16 (1.5× fewer MACs)")
    ap.add_argument("--ratios", nargs="+", type=float, help="MACs reduction targets (default: per model)")
    ap.add_argument("--latency-targets", nargs="+", type=float, default=[1.5, 2.0, 3.0],
                    help="measured speedup targets (GMPConfig(budget='latency', target_speedup=...))")
    ap.add_argument("--no-latency-targets", action="store_true")
    ap.add_argument("--latency-iterations", type=int, default=6, help="pruned networks measured per latency target")
    ap.add_argument("--latency-tolerance", type=float, default=0.03, help="a latency target's relative tolerance")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--vit-batch", type=int, default=64)
    ap.add_argument("--small-batches", nargs="*", type=int, default=[1, 16], help="also time these batch sizes")
    ap.add_argument("--vit-heads", action="store_true",
                    help="ViT: an ours+latency+heads arm and heads+MLP latency targets (nn.MultiheadAttention swapped "
                         "for an explicit module)")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--iters", type=int, default=30, help="timed calls per block (two blocks a timing)")
    ap.add_argument("--warmup", type=int, default=None, help="least warm-up calls (default: min(10, iters))")
    ap.add_argument("--max-warmup", type=int, default=None,
                    help="most warm-up calls while the time settles (default CUDA: 100; CPU: --warmup)")
    ap.add_argument("--repeat", type=int, default=2, help="separately built timings per network at the main batch")
    ap.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None,
                    help="autocast dtype (default bf16 on CUDA, fp32 on CPU)")
    ap.add_argument("--modes", nargs="+", choices=sorted(MODES), default=None,
                    help="deployment modes timed on dense, the fastest picked for every arm (default CUDA: eager "
                         "eager+bf16 cuda-graph cuda-graph+bf16 compile; CPU: eager)")
    ap.add_argument("--reference-modes", nargs="*", choices=sorted(MODES), default=[],
                    help="modes timed on dense only, after the arms (e.g. compile max-autotune)")
    ap.add_argument("--round-to", default="auto",
                    help="round_to of the +round and latency arms: an int, or 'auto' (CUDA: the width_latency_table "
                         "suggestion; CPU: 8)")
    ap.add_argument("--budget", choices=["uniform", "global", "erk"], default="uniform", help="GMP budget (ours)")
    ap.add_argument("--p", type=int, choices=[1, 2], default=2, help="Lp norm of the magnitude importance")
    ap.add_argument("--latency-points", type=int, default=4, help="LatencyModel grid_points (widths per layer axis)")
    ap.add_argument("--latency-weights", nargs="+", type=float, default=[1.0],
                    help="ours+latency arms, one per latency_importance_weight (0: pure latency; 1: default)")
    ap.add_argument("--max-group-sparsity", type=float, default=1.0,
                    help="latency arms: largest fraction of one group's structures removed (0.5 keeps half the heads)")
    ap.add_argument("--heads-max-group-sparsity", type=float, default=None,
                    help="the cap of ViT's MACs-target heads arm (default: --max-group-sparsity); 0.5 keeps half "
                         "of every layer's heads, which random weights otherwise reduce to one")
    ap.add_argument("--target-max-group-sparsity", type=float, default=None,
                    help="the same cap for the latency-target arms (ours@N×; default: --max-group-sparsity): at 0.5 "
                         "every group halved is ~4× fewer MACs, which bounded ResNet-50 on the H200 at 1.72×")
    ap.add_argument("--depth", action="store_true",
                    help="latency targets the widths miss at the cap remove residual branches first, then search the "
                         "widths of the shallower network (benchmarks/speed_lib/depth_arm.py)")
    ap.add_argument("--no-tp", action="store_true", help="skip the Torch-Pruning arms")
    ap.add_argument("--arms", nargs="+", help="only these MACs-target arms (also: ours); dense always runs")
    ap.add_argument("--tp-steps", type=int, default=20, help="TP iterative steps (ratio 0 → 0.95) to find the target")
    ap.add_argument("--refine", type=int, default=5, help="TP bisection steps after the iterative search")
    ap.add_argument("--no-cudnn-benchmark", action="store_true")
    ap.add_argument("--small-batch-guard", action="store_true",
                    help="a latency-target network slower than dense at a --small-batches size is searched again at "
                         "twice the round_to; the one meeting the target and nowhere slower is kept (both in the JSON)")
    ap.add_argument("--small-batch-autotune", action="store_true",
                    help="time --small-batches with cuDNN's autotuner too (default: its heuristics, which on the H200 "
                         "were faster and repeatable at batch 1 and 16; sparsify.measure.cudnn)")
    ap.add_argument("--no-fuse", action="store_true", help="eager modes without conv+bias+ReLU fusion")
    ap.add_argument("--s2d-stem", action="store_true", help="stride-2 stem conv as space-to-depth (sparsify.deploy)")
    ap.add_argument("--profile", action="store_true",
                    help="kernel time by kind and layers alone vs in the network, per network, in the JSON")
    ap.add_argument("--time-budget", type=float, default=None, help="seconds for the whole run (work that does "
                                                                     "not fit is skipped and reported)")
    ap.add_argument("--reserve-s", type=float, default=20.0, help="with --time-budget: seconds kept for the end")
    ap.add_argument("--out", type=Path)
    return ap


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = parser()
    argv = sys.argv[1:] if argv is None else list(argv)  # the command line's flags override a preset's
    first = ap.parse_args(argv)
    args = ap.parse_args(PRESETS[first.preset] + argv) if first.preset else first
    args.warmup = min(10, args.iters) if args.warmup is None else args.warmup
    cuda = args.device.startswith("cuda")
    args.dtype = args.dtype or ("bf16" if cuda else "fp32")
    args.max_warmup = args.max_warmup if args.max_warmup is not None else (100 if cuda else args.warmup)
    args.modes = args.modes or (["eager", "eager+bf16", "cuda-graph", "cuda-graph+bf16", "compile"] if cuda
                                else ["eager"])
    if args.repeat < 1:
        ap.error("--repeat must be ≥ 1")
    return args


def choose_round_to(args: argparse.Namespace, console: Console, widths: list[dict[str, Any]]) -> int:
    if args.round_to != "auto" or not args.device.startswith("cuda"):
        return 8 if args.round_to == "auto" else int(args.round_to)
    try:
        for op in ("conv1x1", "conv3x3"):
            wt = width_latency_table(op, range(64, 257, 4), batch=args.batch, size=14, device=args.device, iters=10,
                                     warmup=3)
            console.print(wt.table())
            widths.append(wt.to_dict())
        round_to = max(w["suggested"] for w in widths)
    except Exception as exc:  # the tables are a convenience: fall back rather than lose the run
        console.log(f"width_latency_table failed ({type(exc).__name__}: {exc}); using round_to=8")
        round_to = 1
    return 8 if round_to == 1 else round_to  # no rounding suggested: the +round arms use 8 to show its effect


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not args.no_cudnn_benchmark
    console, clock, started = Console(), Clock(args.time_budget), time.perf_counter()
    widths: list[dict[str, Any]] = []
    round_to = choose_round_to(args, console, widths)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    result: dict[str, Any] = {
        "device": device_name, "torch": torch.__version__, "torchvision": tv.__version__,
        "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None, "torch_pruning": tp_version(),
        "settings": {**vars(args), "out": str(args.out), "round_to_used": round_to}, "width_tables": widths,
        "deployment": {}, "rows": []}
    rows: list = []
    names = args.models + (["vit_b_16"] if args.vit and "vit_b_16" not in args.models else [])

    def save() -> None:  # after every row and model: a run cut short keeps what it measured
        result["rows"], result["seconds"] = [asdict(r) for r in rows], time.perf_counter() - started
        if args.out:
            args.out.write_text(json.dumps(result, indent=1, default=str))

    for k, name in enumerate(names):
        share = (clock.left() - args.reserve_s) / (len(names) - k)
        result["deployment"][name] = bench_model(name, args, round_to, rows, console, clock, share, on_row=save)
        save()
    title = (f"{device_name}, torch {torch.__version__}, {args.dtype}, channels_last, batch {args.batch} "
             f"(ViT {args.vit_batch}), {args.size}px, p50 of {args.iters}×2, {args.repeat} timings")
    Console(width=max(160, console.width)).print(table(rows, title))
    result["markdown"] = markdown(rows)
    console.log(f"total {result['seconds']:.0f} s")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1, default=str))
        args.out.with_suffix(".md").write_text(f"{title}\n\n{result['markdown']}")
    return result


if __name__ == "__main__":
    main()
