"""Which channel widths run fast on the current device (the timing itself is in ``measure/timing.py``).

``width_latency_table`` times one layer (a 1×1 or 3×3 convolution, or a linear layer, with as many
input as output channels) at every width of a range and suggests the ``round_to`` that makes pruned
widths fastest: for each candidate ``r`` it takes every measured width ``w``, rounds it up to a
multiple of ``r`` and averages the measured latency of the rounded widths. ``r = 1`` (no rounding)
competes too, so the suggestion is only a rounding that the measurements say pays for its extra
channels. On GPUs, multiples of 8 (tensor cores) and of the kernels' tile sizes (often 64 or 128)
tend to win; on CPUs rounding rarely matters.

    table = width_latency_table("conv1x1", device="cuda")
    print(table); SparsifierConfig(..., round_to=table.suggested)
"""

from __future__ import annotations

import io
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from sparsify.measure.progress import progress
from sparsify.measure.timing import autocast_context, measure_latency

__all__ = ["WidthTable", "suggest_round_to", "width_latency_table"]

Op = Literal["conv1x1", "conv3x3", "linear"]
_CANDIDATES = (1, 8, 16, 32, 64, 128)


@dataclass
class WidthTable:
    """Median latency per width of one layer type, and the ``round_to`` it suggests."""

    op: str
    device: str
    settings: dict[str, Any]
    ms: dict[int, float]
    scores: dict[int, float] = field(default_factory=dict)  # candidate round_to → mean ms of rounded widths
    suggested: int = 1

    def table(self) -> Table:
        t = Table(title=f"{self.op} latency by width on {self.device} (suggested round_to={self.suggested})")
        for col in ("round_to", "mean ms of rounded widths", "vs no rounding"):
            t.add_column(col, justify="right")
        base = self.scores.get(1)
        for r, s in self.scores.items():
            t.add_row(str(r), f"{s:.4f}", f"{s / base:.3f}×" if base else "")
        return t

    def __str__(self) -> str:
        """The table as plain text, so that ``print(table)`` shows it."""
        console = Console(file=io.StringIO(), width=120, color_system=None)
        console.print(self.table())
        return console.file.getvalue().rstrip("\n")

    def to_dict(self) -> dict[str, Any]:
        return {"op": self.op, "device": self.device, "settings": self.settings,
                "ms": {str(k): v for k, v in self.ms.items()}, "scores": {str(k): v for k, v in self.scores.items()},
                "suggested": self.suggested}


def _layer(op: Op, width: int) -> nn.Module:
    if op == "conv1x1":
        return nn.Conv2d(width, width, 1, bias=False)
    if op == "conv3x3":
        return nn.Conv2d(width, width, 3, padding=1, bias=False)
    if op == "linear":
        return nn.Linear(width, width)
    raise ValueError(f"op must be 'conv1x1', 'conv3x3' or 'linear', got {op!r}")


def suggest_round_to(ms: dict[int, float], candidates: Iterable[int] = _CANDIDATES) -> tuple[int, dict[int, float]]:
    """The candidate ``r`` minimising the mean latency of widths rounded up to multiples of ``r``.

    Only widths whose rounded value every candidate finds in ``ms`` are averaged, so all candidates
    are scored on the same widths. Ties go to the smaller ``r``. Returns (r, {candidate: mean ms}).
    """
    candidates = sorted(set(candidates) | {1})
    if any(int(r) != r or r < 1 for r in candidates):
        raise ValueError(f"candidates must be positive integers, got {candidates}")
    widths = sorted(ms)

    def up(w: int, r: int) -> int:
        return -(-w // r) * r

    usable = [w for w in widths if all(up(w, r) in ms for r in candidates)]
    if not usable:
        raise ValueError("no measured width has its rounded-up width measured for every candidate; measure a range "
                         "of consecutive widths that ends at a multiple of the largest candidate")
    scores = {r: statistics.fmean(ms[up(w, r)] for w in usable) for r in candidates}
    best = min(candidates, key=lambda r: (scores[r], r))
    return best, scores


def width_latency_table(op: Op = "conv1x1", widths: Sequence[int] | None = None, *, batch: int = 256,
                        size: int = 14, tokens: int = 197, device: torch.device | str | None = None,
                        dtype: torch.dtype | None = None, channels_last: bool = True, iters: int = 20,
                        warmup: int = 5, candidates: Iterable[int] = _CANDIDATES) -> WidthTable:
    """Time ``op`` (``width`` in and out channels) at every width and suggest a ``round_to``.

    Convolutions run on ``batch × width × size × size`` inputs (channels_last by default), linear
    layers on ``batch × tokens × width``. ``dtype`` is the autocast dtype (default: bfloat16 on CUDA,
    none elsewhere). ``widths`` defaults to every even width from 64 to 256 (a multiple of the
    largest candidate, so every candidate's rounding stays within the table).
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype is None and device.type == "cuda":
        dtype = torch.bfloat16
    widths = list(range(64, 257, 2) if widths is None else widths)
    if not widths or any(int(w) != w or w < 1 for w in widths):
        raise ValueError(f"widths must be positive integers, got {widths}")
    ms: dict[int, float] = {}
    for w in progress(widths, f"timing {op} widths"):
        layer = _layer(op, w).to(device).eval()
        if op == "linear":
            x = torch.randn(batch, tokens, w, device=device)
        else:
            x = torch.randn(batch, w, size, size, device=device)
            if channels_last:
                layer, x = layer.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)

        def run(layer: nn.Module = layer, x: torch.Tensor = x) -> None:
            with torch.no_grad(), autocast_context(device, dtype):
                layer(x)

        ms[int(w)] = statistics.median(measure_latency(run, iters=iters, warmup=warmup, device=device))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
    suggested, scores = suggest_round_to(ms, candidates)
    settings = {"batch": batch, "size": size, "tokens": tokens, "dtype": str(dtype), "channels_last": channels_last,
                "iters": iters, "warmup": warmup, "torch": torch.__version__}
    return WidthTable(op, name, settings, ms, scores, suggested)
