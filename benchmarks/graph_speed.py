"""Graph-building and pruning speed on the CPU: sparsify against Torch-Pruning (TP).

For each model and repeat (a fresh model each time, built outside the timed regions):

* ours: ``build_channel_graph`` (trace + group), then pruning about half of every prunable group
  (``random_plan(cg, 0.5, exact_only=False)`` + ``prune_channels(..., allow_inexact=True)``);
* TP: ``DependencyGraph().build_dependency``, then ``BasePruner`` (alias ``MetaPruner``) with
  ``MagnitudeImportance(p=2)`` and ``pruning_ratio=0.5``, init + ``step()``, final classifier
  ignored. TP's init builds its own dependency graph, so its prune time already includes one;
  "total" is therefore ours (trace+group + prune) against TP's (init + step).

Medians of ``--repeats`` runs are printed as a table and written as JSON. A model one side cannot
handle shows ``unsupported: <reason>`` (ours) or ``failed: <reason>`` (TP) instead of timings.

    python -m benchmarks.graph_speed --models resnet50 vit_b_16 --repeats 3 --out /tmp/graph_speed.json

HF decoders are traced from two of their layers, the others replicated (``sparsify.graph.repeated_layers``);
``--full-export`` times the full torch.export instead.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sparsify._compat import import_torchvision  # before transformers: it imports torchvision

tv = import_torchvision()

import torch_pruning as tp  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from sparsify import build_channel_graph  # noqa: E402
from sparsify.prune.surgery import prune_channels  # noqa: E402
from sparsify.testing.oracle import random_plan  # noqa: E402


# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelSpec:
    """How to build a model, its example input, and the TP pruner arguments specific to it."""

    build: Callable[[], nn.Module]
    example: Callable[[], Any]
    tp_kwargs: Callable[[nn.Module], dict[str, Any]]


def _image() -> torch.Tensor:
    return torch.randn(1, 3, 224, 224)


def _ignore_last_linear(model: nn.Module) -> dict[str, Any]:
    return {"ignored_layers": [[m for m in model.modules() if isinstance(m, nn.Linear)][-1]]}


def _vit_kwargs(model: nn.Module) -> dict[str, Any]:
    # As TP's torchvision example and test_serialization: torchvision's ViT uses
    # nn.MultiheadAttention (no separate q/k/v Linear to key num_heads on), so the hidden width
    # is rounded to a multiple of the head count, which TP's MHA pruner asserts.
    return {"ignored_layers": [model.heads.head], "round_to": model.encoder.layers[0].num_heads}


def _llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=12,
                         intermediate_size=3072, vocab_size=32000, use_cache=False)
    return LlamaForCausalLM(config)


def _llama_kwargs(model: nn.Module) -> dict[str, Any]:
    # As TP's examples/LLMs/prune_llm.py: heads declared per q/k/v projection, whole heads
    # removed, head dims kept (RoPE), lm_head ignored, logits taken from the output object.
    config = model.config
    num_heads: dict[nn.Module, int] = {}
    for name, m in model.named_modules():
        if name.endswith("self_attn"):
            num_heads[m.q_proj] = config.num_attention_heads
            num_heads[m.k_proj] = config.num_key_value_heads
            num_heads[m.v_proj] = config.num_key_value_heads
    return {"ignored_layers": [model.lm_head], "num_heads": num_heads, "prune_num_heads": True,
            "prune_head_dims": False, "head_pruning_ratio": 0.5, "round_to": 4,
            "output_transform": lambda out: out.logits}


MODELS: dict[str, ModelSpec] = {
    "resnet50": ModelSpec(lambda: tv.models.resnet50(weights=None), _image, _ignore_last_linear),
    "densenet121": ModelSpec(lambda: tv.models.densenet121(weights=None), _image, _ignore_last_linear),
    "vit_b_16": ModelSpec(lambda: tv.models.vit_b_16(weights=None), _image, _vit_kwargs),
    "llama": ModelSpec(_llama, lambda: torch.randint(0, 32000, (1, 32)), _llama_kwargs),
}


# ----------------------------------------------------------------------------------------------
@dataclass
class Side:
    """One library's timings on one model (seconds per repeat), or why it could not run."""

    graph_s: list[float] = field(default_factory=list)
    prune_s: list[float] = field(default_factory=list)
    params_before: int = 0
    params_after: int | None = None
    error: str = ""

    def median(self, what: str) -> float | None:
        values = getattr(self, what)
        return statistics.median(values) if values and not self.error else None


def _reason(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:140]


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    gc.collect()
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def run_ours(spec: ModelSpec, side: Side) -> None:
    """One repeat of ours: trace + group, then prune ~50% of every prunable group."""
    model, x = spec.build().eval(), spec.example()
    side.params_before = _params(model)
    try:
        graph_s, cg = _timed(lambda: build_channel_graph(model, x))
    except Exception as exc:  # any failure is reported in the table
        side.error = f"unsupported: {_reason(exc)}"
        return

    def prune() -> None:
        plan = random_plan(cg, 0.5, exact_only=False)
        prune_channels(cg, plan, allow_inexact=True)

    prune_s, _ = _timed(prune)
    side.graph_s.append(graph_s)
    side.prune_s.append(prune_s)
    side.params_after = _params(model)


def run_tp(spec: ModelSpec, side: Side) -> None:
    """One repeat of TP: build_dependency, then BasePruner init + step on a second fresh model."""
    model, x = spec.build().eval(), spec.example()
    kwargs = spec.tp_kwargs(model)
    transform = kwargs.get("output_transform")
    try:
        graph_s, _ = _timed(lambda: tp.DependencyGraph().build_dependency(
            model, x, output_transform=transform, verbose=False))
    except Exception as exc:
        side.error = f"failed: {_reason(exc)}"
        return
    del model
    model = spec.build().eval()
    kwargs = spec.tp_kwargs(model)
    side.params_before = _params(model)

    def prune() -> None:
        # Fresh group dicts: BasePruner mutates its mutable default out_channel_groups={} with
        # num_heads, which would otherwise leak modules from one run into the next.
        pruner = tp.pruner.MetaPruner(model, x, importance=tp.importance.MagnitudeImportance(p=2),
                                      pruning_ratio=0.5, in_channel_groups={}, out_channel_groups={}, **kwargs)
        pruner.step()

    try:
        prune_s, _ = _timed(prune)
    except Exception as exc:
        side.error = f"failed: {_reason(exc)}"
        return
    side.graph_s.append(graph_s)
    side.prune_s.append(prune_s)
    side.params_after = _params(model)


def _warm_up() -> None:
    """Pay one-off costs (lazy imports, first fx trace, first autograd graph) outside the timings."""
    def build() -> nn.Module:
        return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.Flatten(),
                             nn.Linear(128, 4))

    spec = ModelSpec(build, lambda: torch.randn(1, 3, 8, 8), _ignore_last_linear)
    run_ours(spec, Side())
    run_tp(spec, Side())


# ----------------------------------------------------------------------------------------------
GOAL_RATIO = 0.5  # issue #20: trace + group + prune in at most half Torch-Pruning's time


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def summarise(name: str, ours: Side, theirs: Side) -> dict[str, Any]:
    """One result row (medians, ratios ours/TP) plus the raw timings."""
    og, op, tg, tpr = (ours.median("graph_s"), ours.median("prune_s"), theirs.median("graph_s"),
                       theirs.median("prune_s"))
    ours_total = og + op if og is not None and op is not None else None
    return {
        "model": name,
        "ours_trace_group_s": og, "tp_build_s": tg, "graph_ratio": _ratio(og, tg),
        "ours_prune_s": op, "tp_prune_s": tpr, "prune_ratio": _ratio(op, tpr),
        "ours_total_s": ours_total, "tp_total_s": tpr, "total_ratio": _ratio(ours_total, tpr),
        "ours": asdict(ours), "tp": asdict(theirs),
    }


def _fmt(value: float | None, error: str = "", ratio: bool = False) -> str:
    if value is None:
        return error or "—"
    return f"{value:.2f}×" if ratio else f"{value:.3f}"


def _params_cell(row: dict[str, Any]) -> str:
    def m(n: int | None) -> str:
        return "—" if n is None else f"{n / 1e6:.1f}"

    return f"{m(row['ours']['params_before'])} → {m(row['ours']['params_after'])} / {m(row['tp']['params_after'])}"


def _short(error: str) -> str:
    return error.split(":")[0]


def render(rows: list[dict[str, Any]], title: str) -> Table:
    table = Table(title=title)
    for header in ("model", "ours trace+group s", "TP build s", "ours/TP", "ours prune s",
                   "TP prune s (init+step)", "ours/TP", "total ours/TP", "params M: before → ours / TP"):
        table.add_column(header, justify="left" if header == "model" else "right", overflow="fold")
    for r in rows:
        oe, te = r["ours"]["error"], r["tp"]["error"]
        table.add_row(r["model"], _fmt(r["ours_trace_group_s"], oe), _fmt(r["tp_build_s"], te),
                      _fmt(r["graph_ratio"], ratio=True), _fmt(r["ours_prune_s"], _short(oe)),
                      _fmt(r["tp_prune_s"], _short(te)),
                      _fmt(r["prune_ratio"], ratio=True), _fmt(r["total_ratio"], ratio=True), _params_cell(r))
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per model (median reported)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--out", type=Path, default=Path("/tmp/graph_speed.json"), help="JSON output path")
    parser.add_argument("--full-export", action="store_true",
                        help="torch.export every decoder layer (off: two layers exported, the others replicated)")
    args = parser.parse_args(argv)
    if args.full_export:
        from sparsify.graph import repeated_layers

        repeated_layers.REPEATED_LAYERS.clear()

    warnings.filterwarnings("ignore", category=UserWarning, module=r"torch_pruning(\..*)?")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    console = Console(width=None if Console().is_terminal else 170)
    _warm_up()
    rows = []
    for name in args.models:
        spec, ours, theirs = MODELS[name], Side(), Side()
        for i in range(args.repeats):
            console.log(f"{name}: repeat {i + 1}/{args.repeats}")
            if not ours.error:
                run_ours(spec, ours)
            if not theirs.error:
                run_tp(spec, theirs)
            gc.collect()
        rows.append(summarise(name, ours, theirs))

    machine = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
               "cpu_count": os.cpu_count(), "threads": args.threads,
               "python": platform.python_version(), "torch": torch.__version__,
               "torch_pruning": _version("torch-pruning"), "full_export": args.full_export}
    title = (f"graph build and 50% prune, CPU, {args.threads} thread(s), median of {args.repeats} "
             f"(ratios ours/TP, < 1 = ours faster)")
    console.print(render(rows, title))
    console.print("total: ours trace+group + prune against TP init + step (TP's init builds its own graph).")
    for r in rows:
        if r["total_ratio"] is not None:
            verdict = "met" if r["total_ratio"] <= GOAL_RATIO else "not met"
            console.print(f"{r['model']}: total ours/TP {r['total_ratio']:.2f}× (goal ≤ {GOAL_RATIO}×: {verdict})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine, "repeats": args.repeats, "results": rows}, indent=2))
    console.print(f"wrote {args.out}")


def _version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)


if __name__ == "__main__":
    main()
