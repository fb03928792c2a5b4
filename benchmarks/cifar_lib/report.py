"""``--report``: the run JSON files of a folder as a rich table, a markdown table (runs grouped over seeds,
Δ to the dense baseline at the same seeds), summary JSON files and plots."""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from benchmarks.cifar_lib.widths import plot_widths

BASELINES = ("dense_ft", "dense")  # what Δ is measured against: the protocol's baseline, else from-scratch dense


def load_records(out: Path) -> list[dict]:
    names = [p for p in sorted(out.glob("*.json")) if p.name not in ("summary.json", "summary_grouped.json")]
    records = [json.loads(p.read_text()) for p in names]
    return sorted(records, key=lambda r: (r["model"], r["ratio"], r["arm"], r["seed"]))


def label_of(record: dict) -> str:
    return record.get("label", record["arm"])


def _schedule(record: dict) -> tuple:
    recipe = record["recipe"]
    return record["model"], recipe["epochs"], recipe["prune_epoch"], record.get("init") is not None


def _mean(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def summarize(records: list[dict]) -> list[dict]:
    """One row per (model, schedule, arm with its variants, target): means over the seeds, and the mean
    difference in top-1 to the baseline arm at the seeds both ran."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        groups[(*_schedule(r), label_of(r), r["ratio"])].append(r)
    baselines = {}
    for name in reversed(BASELINES):  # dense_ft wins where both ran
        for key, rs in groups.items():
            if key[-2] == name:
                baselines[key[:-2]] = (name, {r["seed"]: r["top1"] for r in rs})
    rows = []
    for key, rs in groups.items():
        top1 = [r["top1"] for r in rs]
        base_name, base = baselines.get(key[:-2], (None, {}))
        common = [r for r in rs if r["seed"] in base]
        delta = statistics.fmean(r["top1"] - base[r["seed"]] for r in common) if common and base_name != key[-2] \
            else None
        first = rs[0]
        rows.append({
            "model": first["model"], "arm": first["arm"], "label": key[-2], "target": first["ratio"],
            "seeds": sorted(r["seed"] for r in rs), "total_epochs": first["recipe"]["epochs"],
            "prune_epoch": first["recipe"]["prune_epoch"], "init": first.get("init"),
            "sparsify_epochs": first.get("sparsify_epochs"), "finetune_epochs": first.get("finetune_epochs"),
            "macs_before": first["macs_before"], "macs_after": _mean([r["macs_after"] for r in rs]),
            "macs_reduction": _mean([r["macs_before"] / r["macs_after"] for r in rs]),
            "target_met": None if all(r.get("target_met") is None for r in rs)
            else all(r.get("target_met") is not False for r in rs),
            "params_after": _mean([r["params_after"] for r in rs]),
            "top1_mean": statistics.fmean(top1), "top1_std": statistics.stdev(top1) if len(top1) > 1 else 0.0,
            "top1_per_seed": top1, "baseline": base_name, "delta_top1": delta,
            "images_per_s_sparsify": _mean([r.get("images_per_s_sparsify") for r in rs]),
            "images_per_s_finetune": _mean([r.get("images_per_s_finetune") for r in rs]),
            "latency_ms": _mean([r.get("latency_ms") for r in rs]),
            "device": first["device"], "torch": first["torch"],
        })
    return sorted(rows, key=lambda r: (r["model"], r["total_epochs"], r["target"], r["label"]))


def _fmt(value: float | None, spec: str, scale: float = 1.0) -> str:
    return "–" if value is None else format(value * scale, spec)


def _met(met: bool | None) -> str:
    return "–" if met is None else "yes" if met else "**no**"


def markdown_table(rows: list[dict]) -> str:
    """The table the docs page pastes."""
    lines = ["| model | arm | target | MACs × | params (k) | top-1 % (mean ± std, seeds) | Δ top-1 to baseline | "
             "images/s, sparsify phase | images/s, pruned net | latency ms (b256, bf16) | target met |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        delta = "–" if r["delta_top1"] is None else f"{100 * r['delta_top1']:+.2f} ({r['baseline']})"
        lines.append(
            f"| {r['model']} | {r['label']} | {r['target']:g}× | {r['macs_reduction']:.2f} | "
            f"{r['params_after'] / 1e3:.0f} | {100 * r['top1_mean']:.2f} ± {100 * r['top1_std']:.2f} "
            f"({len(r['seeds'])}) | {delta} | {_fmt(r['images_per_s_sparsify'], ',.0f')} | "
            f"{_fmt(r['images_per_s_finetune'], ',.0f')} | {_fmt(r['latency_ms'], '.2f')} | "
            f"{_met(r['target_met'])} |")
    return "\n".join(lines) + "\n"


def _rich_table(records: list[dict]) -> Table:
    table = Table(title=f"CIFAR-10 ({records[0]['device'] if records else '?'})")
    for col in ("model", "arm", "target", "seed", "MACs (M)", "MACs ×", "params (k)", "top-1 %", "before prune %",
                "right after %", "after, BN recal. %", "train s", "images/s"):
        table.add_column(col, justify="left" if col in ("model", "arm") else "right")
    for r in records:
        def pct(k: str, r: dict = r) -> str:
            return f"{100 * r[k]:.2f}" if k in r else "–"

        table.add_row(r["model"], label_of(r), f"{r['ratio']:g}×", str(r["seed"]), f"{r['macs_after'] / 1e6:.1f}",
                      f"{r['macs_before'] / r['macs_after']:.2f}", f"{r['params_after'] / 1e3:.0f}", pct("top1"),
                      pct("top1_before_prune"), pct("top1_after_prune"),
                      pct("top1_after_prune_bn_recalibrated"), f"{r['train_seconds']:.0f}",
                      f"{r['images_per_s']:,.0f}")
    return table


def report(out: Path, results_json: Path | None = None) -> list[dict]:
    """Print the tables, write summary.json (every run, no per-epoch logs), table.md, the plots, and
    the grouped rows to ``results_json`` when given. Returns the grouped rows."""
    out = Path(out)
    records = load_records(out)
    Console(width=200).print(_rich_table(records))
    (out / "summary.json").write_text(json.dumps([{k: v for k, v in r.items() if k != "epochs"} for r in records],
                                                 indent=1, default=str))
    rows = summarize(records)
    table = markdown_table(rows)
    print(table)
    (out / "table.md").write_text(table)
    if results_json is not None:
        results_json = Path(results_json)
        results_json.parent.mkdir(parents=True, exist_ok=True)
        commands = sorted({r["command"] for r in records})
        results_json.write_text(json.dumps({"rows": rows, "commands": commands}, indent=1, default=str) + "\n")
        print(f"wrote {results_json}")
    _plot(rows, "macs_after", "MACs per image (M)", 1e-6, out / "accuracy_vs_macs.png")
    if any(r["latency_ms"] is not None for r in rows):
        _plot(rows, "latency_ms", "latency of the deployed net, batch 256, bf16 (ms)", 1.0,
              out / "accuracy_vs_latency.png")
    plot_widths(records, out / "widths.png")
    return rows


def _plot(rows: list[dict], key: str, xlabel: str, scale: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    by_label: dict[Any, list[dict]] = defaultdict(list)
    for r in rows:
        if r[key] is not None:
            by_label[(r["model"], r["label"])].append(r)
    for (model, label), rs in sorted(by_label.items()):
        rs.sort(key=lambda r: r[key])
        ax.errorbar([r[key] * scale for r in rs], [100 * r["top1_mean"] for r in rs],
                    yerr=[100 * r["top1_std"] for r in rs], fmt="o-", capsize=3,
                    label=label if len({m for m, _ in by_label}) == 1 else f"{model} {label}")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("top-1 (%)")
    ax.set_title("CIFAR-10: accuracy against " + ("MACs" if key == "macs_after" else "latency"))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")
