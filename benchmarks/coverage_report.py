"""The coverage page from the coverage JSON files:

    python -m benchmarks.coverage_report [--results benchmarks/results] [--out docs/results/coverage.md]

One row per family (suite, family, model, groups, exact prunable, oracle relative error, result / reason,
Torch-Pruning builds / prunes / runs, the same channel graph in two processes) and the totals against the goals
of issue #21.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

GOALS = {"timm": 0.95, "hf": 0.90, "torchvision": None}
HEADER = ("| suite | family | model | groups | exact prunable | oracle rel. error | result / reason "
          "| TP builds / prunes / runs | same graph in 2 processes |\n|---|---|---|---:|---:|---:|---|---|---|")


def _cell(text: str, limit: int = 160) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _tp(rec: dict[str, Any]) -> str:
    tp = rec.get("torch_pruning")
    if not tp:
        return "—"
    marks = " / ".join("yes" if tp.get(k) else "no" for k in ("builds", "prunes", "runs"))
    return marks + (f" ({_cell(tp['error'], 70)})" if tp.get("error") else "")


def _result(rec: dict[str, Any]) -> str:
    if rec["result"] == "sub-config":
        return f"sub-config of {rec['sub_config_of']} (not counted)"
    text = rec["result"] if rec["result"] == "exact" else f"**{rec['result']}**: {_cell(rec.get('reason', ''))}"
    if rec.get("sub_config_of"):  # run before the rule: its result stays, not counted
        text = f"sub-config of {rec['sub_config_of']} (not counted); run as a model: {text}"
    if rec.get("precision"):  # x.float() inside the float64 model: that precision's tolerance
        text += f" (it {_cell(rec['precision'], 90)}: pass ≤ {rec['rel_tol']:g})"
    cache = rec.get("use_cache")
    if cache:
        extra = cache["result"]
        if extra != "exact":
            extra += f": {_cell(cache.get('reason', ''), 90)}"
        text += f"; use_cache on: {extra}"
    return text


def _same_graph(rec: dict[str, Any]) -> str:
    if "groups" not in rec:  # no graph traced
        return "—"
    if rec.get("deterministic") is None:
        return "not checked" + (f" ({_cell(rec['determinism_error'], 70)})" if rec.get("determinism_error") else "")
    return "yes" if rec["deterministic"] else f"no: {_cell(rec.get('determinism', ''), 120)}"


def row(suite: str, rec: dict[str, Any]) -> str:
    rel = rec.get("rel_error")
    return (f"| {suite} | {rec['family']} | {rec.get('model', '—')} | {rec.get('groups', '—')} | "
            f"{rec.get('exact', '—')} | {'—' if rel is None else f'{rel:.1e}'} | {_result(rec)} | {_tp(rec)} | "
            f"{_same_graph(rec)} |")


def goal_lines(suite: str, data: dict[str, Any]) -> list[str]:
    t = data["totals"]
    built, exact = t["built"], t["results"].get("exact", 0)
    share = exact / built if built else 0.0
    goal = GOALS[suite]
    verdict = "" if goal is None else f" (goal ≥ {goal:.0%}: {'met' if share >= goal else 'not met'})"
    others = {k: v for k, v in t["results"].items() if k not in ("exact", "not built")}
    tp = t["torch_pruning"]
    subs = f" (and {t['sub_configs']} sub-configs, not counted)" if t.get("sub_configs") else ""
    return [f"* **{suite}**: {t['families']} families{subs}, {built} build; {exact} prune with at least one exact "
            f"group = {share:.1%} of those that build{verdict}; oracle failures on groups marked exact: "
            f"{t['oracle_failures']}; the rest: {others or 'none'}; not built: {t['results'].get('not built', 0)}. "
            f"Torch-Pruning on the families that build: builds {tp['builds']}, prunes {tp['prunes']}, "
            f"runs {tp['runs']}.{_determinism(t)}"]


def _determinism(totals: dict[str, Any]) -> str:
    det = totals.get("deterministic")
    if not det:
        return " Determinism: not checked yet (`--determinism`)."
    differ = ", ".join(det["differ"]) or "none"
    return (f" Determinism (`--determinism`, of the families with a traced graph): the same channel graph in two "
            f"processes: {det['same']} of {det['checked']} checked; differs: {differ}.")


def render(results: Path) -> str:
    parts, rows, meta = [], [], []
    for suite in GOALS:
        path = results / f"coverage_{suite}.json"
        if not path.exists():
            parts.append(f"* **{suite}**: not run yet")
            continue
        data = json.loads(path.read_text())
        parts += goal_lines(suite, data)
        m = data["machine"]
        meta.append(f"* {suite}: `{data['command']}`, {data['date']}, {m['platform']} ({m['cpus']} CPUs), "
                    f"torch {m['torch']}, timm {m['timm']}, transformers {m['transformers']}, "
                    f"torchvision {m['torchvision']}, torch-pruning {m['torch-pruning']}")
        rows += [row(suite, rec) for rec in data["models"].values()]
    return "\n".join([
        "# Coverage zoo",
        "",
        "Generated by `python -m benchmarks.coverage_report` from `benchmarks/results/coverage_<suite>.json`, "
        "which `python -m benchmarks.coverage --suite <suite>` writes (issue #21). Each family: its model is "
        "built (timm: the smallest variant by parameter count of each `timm.list_modules()` module, "
        "`pretrained=False`, a 64×64 input where the model takes it; Hugging Face: every "
        "`CONFIG_MAPPING` model type with a tiny config — 2 layers, width 64, 4 heads, 2 KV heads, "
        "intermediate 128, vocabulary 128 where the config has those fields; where two layers do not build, "
        "one layer of each layer type (a hybrid whose first layers are all linear attention), else the "
        "config's own depth — and the first task head of "
        "causal LM, masked LM, seq2seq LM, image / audio classification, AutoModel), traced and grouped, "
        "about half of every exact group is zeroed and pruned, and the outputs are compared in float64 "
        "(relative error = max |diff| / max |output|, pass ≤ 1e-9; a model that computes in a lower "
        "precision inside, such as `x.float()`, passes within that precision's rounding: ≤ 1e-5 for float32). "
        "Torch-Pruning runs on a fresh copy of the "
        "same model: `DependencyGraph.build_dependency`, one 50 % `MetaPruner` step (classifier / LM head "
        "ignored), a forward (a family run with `--no-torch-pruning` shows — there). Hugging Face decoders are "
        "checked with `use_cache` off and on (on: the cache's tensors are outputs, compared too; its KV heads "
        "are then outputs and stay). Sub-model types (`*_text_model`) are built with their own `*Model` class; "
        "MoE experts run with `experts_implementation=\"batched_mm\"` (float64, exportable). "
        "A Hugging Face model type that no auto class of any task knows and whose config class is a "
        "`sub_configs` entry of another model type's config (`clap_text_model` of `clap`) is a **sub-config**: "
        "a part of that family, checked within it, not a family of its own; it is listed as `sub-config of "
        "<parent>` and left out of the family counts and shares (one run as a model before this rule keeps "
        "its result in the row, also not counted). A model type that some task head knows (AutoModel, "
        "backbone, segmentation, …) is always a family. "
        "Results: `exact` (≥ 1 exact group pruned, outputs agree), `FAIL` (a group "
        "marked exact changed the outputs: a bug), `refused` (no exact group prunable; the first reason the "
        "graph gives), `error` (tracing or grouping raised; the error), `not built` (the tiny model or its "
        "inputs could not be made: left out of the shares), `timeout`, `sub-config` (not run, not counted). "
        "*Same graph in 2 processes* (`--determinism`, trace and group only): the family's tiny model is built "
        "again in a fresh process (a random hash seed, other memory) and its channel-graph signature compared "
        "with the zoo run's (a record without one: two fresh processes compared); `no` names the first "
        "differing group. One model is not deterministic itself: transformers' NeoMME (`neomme`, 5.25) builds "
        "its rotary embeddings in the order of `set(config.layer_types)`, which depends on the hash seed, so "
        "its traced graph's node order and the auto-generated node names its groups' reasons quote change "
        "from process to process; its check passes or fails by chance, with nothing in sparsify to order it.",
        "",
        "Run (from the repository root; resumable, `--limit N` / `--families a,b` for a part, `--redo` to re-run):",
        "",
        "```",
        "nice -n 19 env OMP_NUM_THREADS=1 python -m benchmarks.coverage --suite timm --jobs 2 "
        "--out benchmarks/results/coverage_timm.json",
        "nice -n 19 env OMP_NUM_THREADS=1 python -m benchmarks.coverage --suite hf --jobs 2 "
        "--out benchmarks/results/coverage_hf.json  # --task causal_lm: decoders first",
        "nice -n 19 env OMP_NUM_THREADS=1 python -m benchmarks.coverage --suite hf --determinism --jobs 1",
        "python -m benchmarks.coverage_report",
        "```",
        "",
        "The whole zoo takes hours on 2 shared cores (timm: 98 families at ~30 s each with Torch-Pruning; "
        "Hugging Face: ~820 model types), beyond CI's budget for `-m slow`; CI runs the fast sample of "
        "`tests/benchmarks/test_coverage.py` (timm cspnext, Hugging Face llama with use_cache on and off, bert). "
        "Families not yet in the JSON files have not been run.",
        "",
        "## Totals against the goals",
        "",
        *parts,
        "",
        "## Runs",
        "",
        *meta,
        "",
        "## Families",
        "",
        HEADER,
        *rows,
        "",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--out", type=Path, default=Path("docs/results/coverage.md"))
    args = parser.parse_args(argv)
    args.out.write_text(render(args.results))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
