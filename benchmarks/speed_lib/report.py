"""Rows of the speed benchmark, the console table, the markdown table and the repeatability figures."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rich.table import Table


@dataclass
class Row:
    model: str
    target: float | None  # MACs reduction target; None for dense and latency-target arms
    arm: str
    round_to: int | None = None
    mode: str = ""  # deployment mode the row was timed in (the same for every arm of a model)
    macs_g: float | None = None
    reduction: float | None = None
    ms: float | None = None  # main batch, first timing
    speedup: float | None = None
    realised: float | None = None
    params_m: float | None = None
    prune_s: float | None = None
    ms_repeats: list[float] = field(default_factory=list)  # main batch, every separately built timing
    realised_spread: float | None = None  # (max − min) / mean of the realised ratios over the repeats
    small_batch_ms: dict[str, float] = field(default_factory=dict)  # "1", "16" → ms
    small_batch_speedup: dict[str, float] = field(default_factory=dict)
    timing: dict[str, Any] = field(default_factory=dict)  # the first main-batch timing (method, quantiles, ...)
    info: dict[str, Any] = field(default_factory=dict)
    error: str = ""


def spread(values: list[float]) -> float | None:
    """(max − min) / mean; None for fewer than two values."""
    if len(values) < 2:
        return None
    mean = sum(values) / len(values)
    return (max(values) - min(values)) / mean if mean else None


def fill_ratios(row: Row, dense: Row) -> None:
    """speedup, realised and their spread over repeats (repeat k against the dense network's repeat k)."""
    row.speedup = dense.ms / row.ms
    row.realised = row.speedup / row.reduction
    pairs = list(zip(dense.ms_repeats, row.ms_repeats, strict=False))
    row.realised_spread = spread([d / m / row.reduction for d, m in pairs])
    for b, ms in row.small_batch_ms.items():
        if b in dense.small_batch_ms:
            row.small_batch_speedup[b] = dense.small_batch_ms[b] / ms


def _f(v: float | None, spec: str, suffix: str = "") -> str:
    return "" if v is None else format(v, spec) + suffix


def _target(r: Row) -> str:
    if r.target is not None:
        return f"{r.target:g}× MACs"
    t = r.info.get("target_speedup")
    return f"{t:g}× speed" if t else ""


COLUMNS = ("model", "mode", "target", "arm", "MACs ↓", "ms", "speedup", "realised", "spread", "b1 speedup",
           "b16 speedup", "params M", "odd widths")


def cells(r: Row) -> list[str]:
    if r.error:
        return [r.model, r.mode, _target(r), r.arm, r.error[:70], *[""] * (len(COLUMNS) - 5)]
    return [r.model, r.mode, _target(r), r.arm, _f(r.reduction, ".2f", "×"), _f(r.ms, ".3f"), _f(r.speedup, ".2f", "×"),
            _f(r.realised, ".2f"), _f(r.realised_spread and 100 * r.realised_spread, ".1f", " %"),
            _f(r.small_batch_speedup.get("1"), ".2f", "×"), _f(r.small_batch_speedup.get("16"), ".2f", "×"),
            _f(r.params_m, ".2f"), str(r.info.get("widths_not_multiple_of_8", ""))]


def table(rows: list[Row], title: str) -> Table:
    t = Table(title=title)
    for col in COLUMNS:
        t.add_column(col, justify="left" if col in ("model", "arm", "mode", "target") else "right")
    for r in rows:
        t.add_row(*cells(r))
    return t


def markdown(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in cells(r)) + " |" for r in rows]
    return "\n".join(lines) + "\n"
