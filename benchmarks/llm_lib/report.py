"""The LM benchmark's table: one row per (method, target), from the per-run JSONs of ``benchmarks.llm``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

COLUMNS = ("method", "target", "params", "met", "ppl one-shot", "ppl recovered", "tokens/s", "peak MiB",
           "prune s", "graph s")


def load(out: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(Path(out).glob("*.json")) if p.name != "report.json"]


def _fmt(value: Any, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (method, target): the one-shot and recovered records side by side."""
    by_key: dict[tuple[str, float], dict[str, Any]] = {}
    for r in records:
        row = by_key.setdefault((r["method"], r["target"]), {"method": r["method"], "target": r["target"],
                                                             "target_kind": r.get("target_kind")})
        if r.get("status") != "ok":
            row["error"] = r.get("error", r.get("status"))
            row["status"] = r.get("status", "failed")
            continue
        phase = r["phase"]
        row[f"ppl_{phase}"] = r.get("ppl")
        if phase == "oneshot" or "params" not in row:
            row.update(params=r.get("params"), non_embedding_params=r.get("non_embedding_params"),
                       target_params=r.get("target_params"), target_met=r.get("target_met"),
                       prune_s=r.get("prune_s"), graph_s=r.get("graph_s"), note=r.get("note"))
        row["tokens_per_s"] = r.get("tokens_per_s")
        row["peak_bytes"] = r.get("peak_bytes")
        row["recovery_steps"] = r.get("recovery_steps", row.get("recovery_steps"))
        row["recovery_tokens"] = r.get("recovery_tokens", row.get("recovery_tokens"))
    order = {"dense": -1}
    return sorted(by_key.values(), key=lambda row: (row["target"], order.get(row["method"], 0), row["method"]))


def _target(row: dict[str, Any]) -> str:
    percent = f"{row['target']:.0%}"
    return f"half the experts ({percent})" if row.get("target_kind") == "half the experts" else percent


def cells(row: dict[str, Any]) -> list[str]:
    if "error" in row and "params" not in row:
        why = f"{row.get('status', 'failed')}: " + row["error"][:70].replace("|", "/")
        return [row["method"], _target(row), why, "", "", "", "", "", "", ""]
    met = {True: "yes", False: "no", None: ""}[row.get("target_met")]
    peak = row.get("peak_bytes")
    return [row["method"], _target(row), _fmt(row.get("params"), ","), met,
            _fmt(row.get("ppl_oneshot"), ".2f"), _fmt(row.get("ppl_recovered"), ".2f"),
            _fmt(row.get("tokens_per_s"), ",.0f"), _fmt(None if peak is None else peak / 2**20, ".0f"),
            _fmt(row.get("prune_s"), ".2f"), _fmt(row.get("graph_s"), ".2f")]


def markdown(table: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cells(row)) + " |" for row in table]
    return "\n".join(lines) + "\n"


def report(out: Path, results_json: Path | None = None, markdown_path: Path | None = None) -> list[dict[str, Any]]:
    """Print the table (rich), write it as markdown and the rows as a small JSON; returns the rows."""
    records = load(out)
    table = rows(records)
    meta = next((r.get("meta") for r in records if r.get("meta")), {}) or {}
    try:
        from rich.console import Console
        from rich.table import Table

        shown = Table(title=f"LM pruning: {meta.get('model_dir', out)} on {meta.get('device', '?')}")
        for column in COLUMNS:
            shown.add_column(column, justify="left" if column == "method" else "right")
        for row in table:
            shown.add_row(*cells(row))
        Console(width=200).print(shown)
    except ImportError:
        print(markdown(table))
    markdown_path = Path(markdown_path) if markdown_path else Path(out) / "report.md"
    markdown_path.parent.mkdir(parents=True, exist_ok=True)
    markdown_path.write_text(markdown(table))
    model = meta.get("model_type", "model")
    results_json = Path(results_json) if results_json else Path("benchmarks/results") / f"llm_{model}.json"
    results_json.parent.mkdir(parents=True, exist_ok=True)
    results_json.write_text(json.dumps({"meta": meta, "rows": table}, indent=1, default=float) + "\n")
    return table
