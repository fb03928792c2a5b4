"""Repeatability of `benchmarks.speed` across separate runs (issue #19: two runs, spread ≤ 5 %).

Reads the JSON of two or more runs of the same command (separate processes, ideally separate machines of one
card type), matches rows by (model, target, arm) and prints, per row, the speedup of every run and the spread
= (max − min) / mean of the realised ratio (MACs targets) or of the measured speedup (latency targets), with the
goal checks: spread ≤ ``--max-spread``; a latency target t measured at ≥ 0.95 t in every run; never slower
than dense (every run, every batch size timed). Writes the rows as JSON with ``--out``.

    python -m benchmarks.speed_compare run1/speed_resnet50.json run2/speed_resnet50.json --out compare.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from benchmarks.speed_lib.report import spread

Key = tuple[str, str, str]


def _key(row: dict[str, Any]) -> Key:
    target = row.get("target")
    latency = (row.get("info") or {}).get("target_speedup")
    what = f"{target}× MACs" if target else f"{latency}× speed" if latency else "dense"
    return row["model"], what, row["arm"]


def compare(runs: list[dict[str, Any]], max_spread: float = 0.05) -> list[dict[str, Any]]:
    """One record per (model, target, arm) measured without error in every run."""
    keyed = [{_key(r): r for r in run["rows"] if not r.get("error") and r.get("speedup")} for run in runs]
    common = [k for k in keyed[0] if all(k in other for other in keyed[1:])]
    out = []
    for key in common:
        rows = [run[key] for run in keyed]
        latency = (rows[0].get("info") or {}).get("target_speedup")
        values = [r["speedup"] if latency else r["realised"] for r in rows]
        small = [s for r in rows for s in (r.get("small_batch_speedup") or {}).values()]
        record: dict[str, Any] = {
            "model": key[0], "target": key[1], "arm": key[2], "speedups": [r["speedup"] for r in rows],
            "realised": [r["realised"] for r in rows], "spread_of": "speedup" if latency else "realised",
            "spread": spread(values), "reductions": [r["reduction"] for r in rows],
            "slowest_vs_dense": min([r["speedup"] for r in rows] + small)}
        record["spread_ok"] = record["spread"] is not None and record["spread"] <= max_spread
        record["never_slower"] = key[2] == "dense" or record["slowest_vs_dense"] >= 1.0
        if latency:
            record["target_met_every_run"] = all(s >= 0.95 * latency for s in record["speedups"])
        out.append(record)
    return out


def _cell(ok: bool | None) -> str:
    return "–" if ok is None else "yes" if ok else "[red]no[/red]"


def table(records: list[dict[str, Any]], paths: list[str]) -> Table:
    t = Table(title=f"speed across {len(paths)} runs: {', '.join(paths)}")
    for col in ("model", "target", "arm", "speedup per run", "spread", "≤ max", "target met", "never slower"):
        t.add_column(col)
    for r in records:
        t.add_row(r["model"], r["target"], r["arm"], " / ".join(f"{s:.2f}×" for s in r["speedups"]),
                  f"{100 * r['spread']:.1f} % ({r['spread_of']})" if r["spread"] is not None else "–",
                  _cell(r["spread_ok"]), _cell(r.get("target_met_every_run")), _cell(r["never_slower"]))
    return t


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, help="speed JSON files of separate runs of one command")
    ap.add_argument("--max-spread", type=float, default=0.05)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    if len(args.runs) < 2:
        ap.error("give at least two runs to compare")
    runs = [json.loads(p.read_text()) for p in args.runs]
    cards = {r.get("device") for r in runs}
    records = compare(runs, args.max_spread)
    console = Console(width=160)
    if len(cards) > 1:
        console.print(f"[yellow]runs on different cards: {sorted(map(str, cards))}[/yellow]")
    console.print(table(records, [str(p) for p in args.runs]))
    if args.out:
        args.out.write_text(json.dumps({"runs": [str(p) for p in args.runs], "cards": sorted(map(str, cards)),
                                        "max_spread": args.max_spread, "rows": records}, indent=1))
    return records


if __name__ == "__main__":
    main()
