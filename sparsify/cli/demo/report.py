"""The demo's report: rich tables on the console, ``demo.json``, and the ``widths.png`` bar chart."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table
from torch import nn

__all__ = ["layer_rows", "layer_widths", "print_report", "save_widths_plot", "width_rows", "write_outputs"]


def layer_widths(model: nn.Module) -> dict[str, tuple[int, int]]:
    """(input, output) channels of every conv and linear layer."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            out[name] = (m.in_channels, m.out_channels)
        elif isinstance(m, nn.Linear):
            out[name] = (m.in_features, m.out_features)
    return out


def fmt_ratio(before: float, after: float) -> str:
    return f"{before / after:.2f}×" if after else "–"


def _group_label(name: str, members: Sequence[str], limit: int = 24) -> str:
    """A readable label for a channel group: the BNs that carry its importance vectors."""
    if members:
        return " + ".join(members)
    return name if len(name) <= limit else name[:limit - 1] + "…"


def width_rows(widths_before: Mapping[str, int], widths_after: Mapping[str, tuple[int, int]],
               group_bns: Mapping[str, list[str]]) -> list[dict[str, Any]]:
    """One row per channel group: its label, BNs and width before/after (groups missing from
    ``widths_after``, a prune result's ``{group: (before, after)}``, kept their width)."""
    rows = []
    for name, before in widths_before.items():
        after = widths_after.get(name, (before, before))[1]
        rows.append({"group": name, "label": _group_label(name, group_bns[name]), "bns": group_bns[name],
                     "before": before, "after": after})
    return rows


def layer_rows(before: Mapping[str, tuple[int, int]], after: Mapping[str, tuple[int, int]]) -> list[dict[str, Any]]:
    """One row per conv/linear layer: input and output channels before and after pruning."""
    return [{"layer": name, "in_before": b[0], "in_after": after[name][0], "out_before": b[1],
             "out_after": after[name][1]} for name, b in before.items()]


def save_widths_plot(widths: list[dict[str, Any]], path: Path, title: str) -> None:
    """Grouped bars: width of every layer before and after pruning (``label``, ``before``, ``after``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [w["label"] for w in widths]
    before = np.array([w["before"] for w in widths])
    after = np.array([w["after"] for w in widths])
    pos = np.arange(len(widths))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(widths) + 2.5), 4.8), dpi=120)
    ax.bar(pos - 0.2, before, 0.4, label="before prune", color="#b8c7dc", edgecolor="#4a6a94")
    bars = ax.bar(pos + 0.2, after, 0.4, label="after prune", color="#2f6db3")
    for rect, b, a in zip(bars, before, after, strict=True):
        ax.annotate(f"{a}/{b}", (rect.get_x() + rect.get_width() / 2, a), xytext=(0, 3), textcoords="offset points",
                    ha="center", va="bottom", fontsize=8)
    ax.set_xticks(pos, labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("channels")
    ax.set_title(title, fontsize=10)
    ax.set_ylim(0, before.max() * 1.15 if len(before) else 1)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_outputs(out: Path, results: dict[str, Any], model: nn.Module) -> None:
    """``demo.json`` (``results``) and ``widths.png`` (per layer: conv outputs, the classifier's inputs)."""
    p, data, config = results["prune"], results["data"], results["config"]
    title = (f"{data['name']}: {config['arch']} CNN, STR-BN (adapter bn_gamma, policy str)\n"
             f"channels {p['channels_before']} → {p['channels_after']}, params "
             f"{fmt_ratio(p['params_before'], p['params_after'])} and MACs "
             f"{fmt_ratio(p['macs_before'], p['macs_after'])} fewer; test acc {results['str']['test_acc']:.1%} soft, "
             f"{p['test_acc']:.1%} pruned, {results['finetune']['test_acc']:.1%} fine-tuned")
    bars = []  # convs: output channels; the classifier: its input features (its outputs are the classes)
    for row in results["layers"]:
        side = "in" if isinstance(model.get_submodule(row["layer"]), nn.Linear) else "out"
        label = row["layer"] + (" (in)" if side == "in" else "")
        bars.append({"label": label, "before": row[f"{side}_before"], "after": row[f"{side}_after"]})
    save_widths_plot(bars, out / "widths.png", title)
    (out / "demo.json").write_text(json.dumps(results, indent=2))


def _summary_table(r: dict[str, Any]) -> Table:
    p, lat = r["prune"], r["latency_ms"]
    t = Table(title="STR-BN: before and after prune")
    for col in ("", "before prune", "after prune", "ratio"):
        t.add_column(col, justify="right")
    t.add_row("test accuracy", f"{r['str']['test_acc']:.2%}", f"{p['test_acc']:.2%}", "")
    t.add_row("params", f"{p['params_before']:,}", f"{p['params_after']:,}",
              fmt_ratio(p["params_before"], p["params_after"]))
    t.add_row("MACs / image", f"{p['macs_before']:,}", f"{p['macs_after']:,}",
              fmt_ratio(p["macs_before"], p["macs_after"]))
    t.add_row(f"latency ms (batch {lat['batch']})", f"{lat['before_prune']:.2f}", f"{lat['after_prune']:.2f}",
              fmt_ratio(lat["before_prune"], lat["after_prune"]))
    t.add_row("  same arch, plain BN", f"{lat['unpruned_arch_plain_bn_after']:.2f}", f"{lat['after_prune']:.2f}",
              fmt_ratio(lat["unpruned_arch_plain_bn_after"], lat["after_prune"]))
    t.add_row("BN channels", f"{p['channels_before']}", f"{p['channels_after']}",
              f"{1 - p['channels_after'] / max(p['channels_before'], 1):.1%} removed")
    return t


def _widths_tables(r: dict[str, Any]) -> tuple[Table, Table]:
    w = Table(title="widths per channel group (importance vectors: their BNs)")
    for col, just in (("group", "left"), ("before", "right"), ("after", "right"), ("removed", "right"),
                      ("threshold", "right")):
        w.add_column(col, justify=just)  # type: ignore[arg-type]
    thr = r["str"]["thresholds"]
    for row in r["widths"]:
        th = ", ".join(f"{thr[b]:.3f}" for b in row["bns"] if b in thr)
        w.add_row(row["label"], str(row["before"]), str(row["after"]),
                  f"{1 - row['after'] / max(row['before'], 1):.0%}", th)

    lt = Table(title="widths per layer (channels in → out)")
    for col, just in (("layer", "left"), ("in: before → after", "right"), ("out: before → after", "right")):
        lt.add_column(col, justify=just)  # type: ignore[arg-type]
    for row in r["layers"]:
        lt.add_row(row["layer"], f"{row['in_before']} → {row['in_after']}", f"{row['out_before']} → {row['out_after']}")
    return w, lt


def print_report(console: Console, r: dict[str, Any]) -> None:
    """The demo's tables: before/after summary, widths per group and per layer, accuracies, the exactness check."""
    p = r["prune"]
    console.print(_summary_table(r))
    for table in _widths_tables(r):
        console.print(table)
    a = Table(title="test accuracy")
    a.add_column("model")
    a.add_column("accuracy", justify="right")
    if "dense" in r:
        a.add_row("dense baseline (same recipe, no STR, BN decay = weight decay)", f"{r['dense']['test_acc']:.2%}")
    a.add_row("STR-BN soft model (before prune)", f"{r['str']['test_acc']:.2%}")
    a.add_row("pruned", f"{p['test_acc']:.2%}")
    a.add_row(f"pruned + {r['finetune']['epochs']} epoch(s) fine-tune", f"{r['finetune']['test_acc']:.2%}")
    console.print(a)
    verdict = "[green]equal[/]" if p["outputs_equal"] else "[red]DIFFERENT[/]"
    console.print(f"pruned vs soft outputs on all {r['data']['test']} test images: max |Δ| = {p['max_abs_diff']:.3g} "
                  f"(allowed {p['allowed_abs_diff']:.3g}) → {verdict}")
