"""ATen ops launched by one training step (forward + backward), dense against a Sparsifier.

On a GPU every op is at least one kernel launch, and a CUDA-graphed step replays them all: the op
count is a device-independent proxy for the Sparsifier's step overhead. Counted with a
TorchDispatchMode on the CPU.

    python -m benchmarks.step_ops --model resnet56
"""

from __future__ import annotations

import argparse
from collections import Counter

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks.cifar_lib.models import build
from sparsify import GMPConfig, Sparsifier, STRConfig


class CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


def count(model: torch.nn.Module, sp: Sparsifier | None, cached: bool, batched: bool = True) -> int:
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    with CountOps() as c:
        with sp.cached(batched) if cached else torch.enable_grad():
            out = model(x)
        F.cross_entropy(out, y).backward()
    return sum(c.ops.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet56")
    args = parser.parse_args()
    arms = {"str + bn_gamma (STR-BN)": ("bn_gamma", STRConfig(threshold_fn="exp", s_init=-6.0)),
            "gmp + bn_gamma": ("bn_gamma", GMPConfig()),
            "str + filter_norm": ("filter_norm", STRConfig(threshold_fn="exp", s_init=-6.0)),
            "gmp + filter_norm": ("filter_norm", GMPConfig())}
    torch.manual_seed(0)
    dense = count(build(args.model), None, cached=False)
    table = Table(title=f"ATen ops per training step, {args.model} (dense: {dense})")
    for col in ("arm", "ops", "× dense", "sp.cached(batched=False)", "× dense ", "sp.cached()", "× dense  "):
        table.add_column(col, justify="left" if col == "arm" else "right")
    for name, (adapter, policy) in arms.items():
        model = build(args.model)
        sp = Sparsifier(model, torch.randn(2, 3, 32, 32), adapter, policy)
        plain, cached, batched = count(model, sp, False), count(model, sp, True, False), count(model, sp, True)
        table.add_row(name, str(plain), f"{plain / dense:.2f}", str(cached), f"{cached / dense:.2f}", str(batched),
                      f"{batched / dense:.2f}")
    Console(width=140).print(table)


if __name__ == "__main__":
    main()
