"""Training-step cost of sparsifying: a step with a Sparsifier attached against the same dense step.

Same model, batch, precision and optimizer; the Sparsifier's policy transforms run inside the
forward (parametrizations) and ``sp.step()`` runs after each optimizer step. Prints a table and
writes JSON. Goal (CIFAR benchmark issue): ≤ 1.05× the dense step for STR-BN.

    python -m benchmarks.step_overhead --model resnet18 --batch 256 --size 32 --steps 50 --out /tmp/step_overhead.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from sparsify import GMPConfig, Sparsifier, STRConfig
from sparsify._compat import import_torchvision

ARMS: dict[str, tuple[str, Any] | None] = {
    "dense": None,
    "str + bn_gamma (STR-BN)": ("bn_gamma", STRConfig(s_init=-5.0)),
    "gmp + bn_gamma": ("bn_gamma", GMPConfig(sparsity=0.5, end_step=10_000, update_every=100)),
    "gmp + filter_norm": ("filter_norm", GMPConfig(sparsity=0.5, end_step=10_000, update_every=100)),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(arm: str, args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    tv = import_torchvision()
    torch.manual_seed(0)
    model = tv.models.get_model(args.model, num_classes=10).to(device)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    sp = None
    if ARMS[arm] is not None:
        adapter, policy = ARMS[arm]
        sp = Sparsifier(model, x[:2], adapter, policy)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    times = []
    for i in range(args.warmup + args.steps):
        _sync(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=args.bf16):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if sp is not None:
            sp.step()
        _sync(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return {"median_s": median, "images_per_s": args.batch / median}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                        help="bf16 autocast (default: on for CUDA)")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--out", default="/tmp/step_overhead.json")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.bf16 = device.type == "cuda" if args.bf16 is None else args.bf16
    results = {arm: measure(arm, args, device) for arm in ARMS}
    dense = results["dense"]["median_s"]
    title = (f"{args.model}, batch {args.batch}, {args.size}×{args.size}, {'bf16' if args.bf16 else 'fp32'}, "
             f"{'channels_last' if args.channels_last else 'NCHW'}, "
             f"{torch.cuda.get_device_name() if device.type == 'cuda' else platform.processor() or 'CPU'}")
    table = Table(title=title)
    for col in ("arm", "step ms (median)", "images/s", "× dense"):
        table.add_column(col, justify="left" if col == "arm" else "right")
    for arm, r in results.items():
        table.add_row(arm, f"{r['median_s'] * 1e3:.2f}", f"{r['images_per_s']:,.0f}", f"{r['median_s'] / dense:.3f}")
    Console().print(table)
    record = {"args": vars(args), "device": title, "torch": torch.__version__, "results": results}
    with open(args.out, "w") as f:
        json.dump(record, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
