"""Per-layer widths of the pruned networks: recorded in each run's JSON, plotted by ``--report`` (issue #18:
where an arm's accuracy gap comes from — the per-layer widths it learned against the others')."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from torch import nn


def conv_widths(model: nn.Module) -> dict[str, int]:
    """Output channels of every conv, in module order (a DDP/compile wrapper's prefix included as it is)."""
    return {name: m.out_channels for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}


def plot_widths(records: list[dict], path: Path) -> bool:
    """One panel per MACs target: kept fraction of every conv's channels (dense = 1) per arm, seed 0 (or the
    lowest seed recorded). Returns False, writing nothing, when no pruned run recorded its widths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen: dict[float, dict[str, dict]] = defaultdict(dict)
    for r in sorted(records, key=lambda r: r.get("seed", 0)):
        if r.get("widths") and r.get("dense_widths") and r.get("ratio", 1.0) != 1.0:
            chosen[r["ratio"]].setdefault(r["label"], r)
    if not chosen:
        return False
    fig, axes = plt.subplots(len(chosen), 1, figsize=(9, 3.2 * len(chosen)), squeeze=False)
    for ax, (ratio, by_label) in zip(axes[:, 0], sorted(chosen.items()), strict=True):
        for label, r in sorted(by_label.items()):
            names = list(r["dense_widths"])
            ax.plot(range(len(names)), [r["widths"].get(n, 0) / r["dense_widths"][n] for n in names],
                    ".-", label=f"{label} ({r['top1'] * 100:.2f} %)")
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("kept fraction")
        ax.set_title(f"{ratio:g}× fewer MACs: kept channels per conv (input side first)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[-1, 0].set_xlabel("conv layer (module order)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")
    return True
