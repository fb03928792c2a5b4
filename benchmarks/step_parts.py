"""Where a training step of the CIFAR harness's arms spends its time: forward, backward, optimizer, arm step.

The step of ``benchmarks.cifar`` (the arm's cache context inside the forward, ``after_backward``, the
optimizer, ``after_step``: ``Sparsifier.step()`` for the sparsify arms), eager, each part timed on its own
(synchronized on a GPU) for ``--steps`` steps after ``--warmup``, in the middle of the sparsify phase
(the STR controller active). Prints the medians (and the mean of the arm step, which holds the controller's
updates) and writes JSON. A diagnostic for the per-step cost of each arm, not the harness's images/s
(which the CUDA-graphed run measures).

    python -m benchmarks.step_parts --arms dense str_bn str_filter gmp_global_filter --batch 32 --steps 20
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from benchmarks.cifar_lib.arms import ARMS
from benchmarks.cifar_lib.models import build
from benchmarks.cifar_lib.train import CachedForward

PARTS = ("forward", "backward", "optimizer", "arm_step")


def _now(device: torch.device) -> float:
    """The clock after the device's queued work (a GPU runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def measure(arm_name: str, args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    """Median seconds of each part of the step (and the arm step's mean) for one arm."""
    torch.manual_seed(0)
    model = build(args.model).to(device)
    x = torch.randn(args.batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    steps_per_epoch, prune_epoch = args.steps_per_epoch, 30
    arm = ARMS[arm_name](args.ratio, steps_per_epoch, prune_epoch, 0)
    arm.setup(model, x[:2])
    sp = getattr(arm, "sp", None)
    first = steps_per_epoch * prune_epoch // 3  # mid-ramp: the controller has a target to track
    if sp is not None:
        sp.step_count = first
    net = CachedForward(model, arm.cache)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
    model.train()
    times: dict[str, list[float]] = {p: [] for p in PARTS}
    for i in range(args.warmup + args.steps):
        marks = [_now(device)]
        loss = F.cross_entropy(net(x).float(), y)
        marks.append(_now(device))
        opt.zero_grad(set_to_none=False)
        loss.backward()
        arm.after_backward()
        marks.append(_now(device))
        opt.step()
        marks.append(_now(device))
        arm.after_step(first + i + 1)
        marks.append(_now(device))
        if i >= args.warmup:
            for part, a, b in zip(PARTS, marks[:-1], marks[1:], strict=True):
                times[part].append(b - a)
    out = {f"{p}_s": statistics.median(times[p]) for p in PARTS}
    out["arm_step_mean_s"] = statistics.fmean(times["arm_step"])
    out["step_s"] = sum(out[f"{p}_s"] for p in PARTS)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arms", nargs="+", default=["dense", "str_bn", "str_filter", "gmp_global_filter"],
                   choices=sorted(ARMS))
    p.add_argument("--model", default="resnet56")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--ratio", type=float, default=2.13)
    p.add_argument("--steps-per-epoch", type=int, default=391, help="sets the controller's period (¼ epoch)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default=None)
    p.add_argument("--out", default="/tmp/step_parts.json")
    args = p.parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    results = {arm: measure(arm, args, device) for arm in args.arms}
    dense = results[args.arms[0]]["step_s"]
    where = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "CPU"
    table = Table(title=f"{args.model}, batch {args.batch}, fp32, eager, {where} (ms, medians)")
    for col in ("arm", *PARTS, "arm step (mean)", "step", f"× {args.arms[0]}"):
        table.add_column(col, justify="left" if col == "arm" else "right")
    for arm, r in results.items():
        table.add_row(arm, *(f"{1e3 * r[f'{q}_s']:.2f}" for q in PARTS), f"{1e3 * r['arm_step_mean_s']:.2f}",
                      f"{1e3 * r['step_s']:.2f}", f"{r['step_s'] / dense:.2f}")
    Console(width=160).print(table)
    record = {"args": vars(args), "device": where, "torch": torch.__version__, "results": results}
    Path(args.out).write_text(json.dumps(record, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
