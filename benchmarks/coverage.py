"""Coverage zoo (issue #21): every timm family, every Hugging Face model type, torchvision beyond classification.

    python -m benchmarks.coverage --suite timm|hf|torchvision [--limit N] [--families a,b] [--jobs 2]
        --out benchmarks/results/coverage_<suite>.json

Per family (each in its own subprocess, with a time limit): build the model (``benchmarks.coverage_vision``
for timm and torchvision, ``benchmarks.coverage_models`` for Hugging Face), trace and group it, prune about half
of every exact group, compare outputs in float64 (the exactness oracle; relative error = max |diff| / max
|output| ≤ 1e-9), and run Torch-Pruning on the same model (DependencyGraph
build, one 50 % MetaPruner step, a forward: builds / prunes / runs). Hugging Face decoders are checked with
``use_cache`` off and on. Results are merged into the JSON as they come (the run is resumable: families already
there are skipped unless ``--redo``). Results:

* ``exact``: at least one exact group was pruned and the outputs agree;
* ``FAIL``: a group marked exact changed the outputs, or pruning it raised an unexpected error (a bug);
* ``inexact at prune``: pruning refused (InexactPruneError, the model left unchanged): removed channels
  of a group marked exact emit a constant that no consumer can absorb (e.g. a scalar bias before a padded
  convolution);
* ``refused``: nothing exact is prunable, with the first reason the graph gives (it names the op);
* ``error``: tracing / grouping raised (the reason is the error's first line);
* ``not built``: the tiny model or its inputs could not be made (left out of the goals' denominators);
* ``timeout`` / ``crash``: the subprocess ran past its limit or died;
* ``sub-config`` (Hugging Face): a model type that is a part of another family (``clap_text_model`` of
  ``clap``: no auto class of any task, its config a sub-config of the parent's), recorded, not run, and not
  counted; a sub-config run before the rule keeps its result, marked ``sub_config_of``, also not counted.

``--merge FILE`` copies the records of another run's JSON into ``--out`` (the file re-read right before writing).
A record run with ``--no-torch-pruning`` (by a run or a merge) keeps the Torch-Pruning result that ``--out`` held
for the same tiny model (same class and parameter count).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import re
import subprocess
import sys
import time
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from pathlib import Path
from typing import Any

import torch

from benchmarks import coverage_models as zoo
from benchmarks import coverage_vision as vision
from sparsify._compat import import_torchvision
from sparsify.errors import InexactPruneError

REL_TOL = 1e-9
SUITES = ("timm", "hf", "torchvision")
MARK = "COVERAGE-RESULT "


# ---------------------------------------------------------------------------------------------- one model
def _outputs(model: torch.nn.Module, inputs: Any) -> list[torch.Tensor]:
    from sparsify.graph.trace import as_args

    args, kwargs = as_args(inputs)
    torch.manual_seed(0)  # models that draw noise inside (ViT-MAE's masking, VITS, UnivNet): the same draws each time
    with torch.no_grad():
        out = model(*args, **kwargs)
    flat, _ = torch.utils._pytree.tree_flatten(out)
    return [t for t in flat if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _reason(exc: BaseException, limit: int = 600) -> str:
    text = " | ".join(line.strip() for line in str(exc).strip().splitlines() if line.strip())
    return f"{type(exc).__name__}: {text}"[:limit]


def check_ours(built: zoo.Built) -> dict[str, Any]:
    """Trace + group, prune ~half of every exact group, the float64 oracle."""
    from sparsify import build_channel_graph
    from sparsify.graph.precision import lower_precision
    from sparsify.testing.oracle import random_plan, randomize_, soft_zero_

    model, inputs, _ = built
    randomize_(model)
    start = time.perf_counter()
    try:
        cg = build_channel_graph(model, inputs)
    except Exception as exc:
        return {"result": "error", "reason": _reason(exc), "trace_s": round(time.perf_counter() - start, 2)}
    rec: dict[str, Any] = {"trace_s": round(time.perf_counter() - start, 2), "groups": len(cg.groups),
                           "signature": cg.signature(), "prunable": len(cg.prunable_groups()),
                           "exact": sum(g.exact for g in cg.prunable_groups())}
    lower = lower_precision(cg.traced)  # x.float() inside the float64 model: that precision's rounding
    tol = lower.rel_tolerance if lower else REL_TOL
    if lower:
        rec.update(precision=lower.describe(), rel_tol=tol)
    plan = random_plan(cg, 0.5, seed=0)
    rec["pruned_groups"] = len(plan)
    if not plan:
        reasons = refusal_reasons(cg)
        rec.update(result="refused", reason=reasons[0][:300] if reasons else "no parameter produces any channel")
        rec["other_reasons"] = [r[:200] for r in reasons[1:4]]
        return rec
    try:
        soft_zero_(model, cg.groups, plan)
        reference = _outputs(model, inputs)
        refused = prune_leaving_out_unfoldable(cg, plan)
        pruned = _outputs(model, inputs)
    except InexactPruneError as exc:  # refused at prune time, the model unchanged: not exact, not wrong
        rec.update(result="inexact at prune", reason=_reason(exc))
        return rec
    except Exception as exc:  # a group marked exact that cannot be pruned is a bug
        rec.update(result="FAIL", reason=f"pruning an exact group raised {_reason(exc)}")
        return rec
    if len(reference) != len(pruned) or any(a.shape != b.shape for a, b in zip(reference, pruned, strict=False)):
        rec.update(result="FAIL", reason="outputs changed shape after pruning")
        return rec
    diff = max((float((a - b).abs().max()) for a, b in zip(reference, pruned, strict=True) if a.numel()), default=0.0)
    scale = max((float(a.abs().max()) for a in reference if a.numel()), default=0.0)
    rel = diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf"))
    rec["rel_error"] = rel
    if refused:
        rec["pruned_groups"] = len(plan) - len(refused)
        rec["refused_at_prune"] = refused
    rec["result"] = "exact" if rel <= tol else "FAIL"
    if rec["result"] == "FAIL":
        rec["reason"] = f"oracle: relative error {rel:.3g} > {tol:g} with {len(plan)} exact groups pruned"
    return rec


def prune_leaving_out_unfoldable(cg: Any, plan: dict[int, Any]) -> list[str]:
    """Prune ``plan``; while pruning refuses (atomically) because removed channels emit constants that a
    padded consumer cannot absorb, leave out the groups feeding the consumers it names and retry. Returns the
    names of the groups left out (they stay zeroed, so the outputs must still agree); raises the refusal
    when it names no consumer of a planned group."""
    from sparsify.prune.surgery import prune_channels

    by_id = {g.id: g for g in cg.groups}
    left_out: list[int] = []
    while True:
        try:
            prune_channels(cg, {k: v for k, v in plan.items() if k not in left_out})
            return [by_id[k].name for k in left_out]
        except InexactPruneError as exc:
            padded = r"'([^']+)' pads its input|input channels of '([^']+)' carry a constant that was zero-padded"
            named = {a or b for a, b in re.findall(padded, str(exc))}
            culprits = [k for k in plan if k not in left_out
                        and any(m.role == "in" and m.module in named for m in by_id[k].members)]
            if not culprits or len(left_out) + len(culprits) >= len(plan):
                raise
            left_out += culprits


def refusal_reasons(cg: Any) -> list[str]:
    """Distinct reasons why the channels that parameters produce are not exactly prunable: ops without a
    rule first, then the most frequent; a parameter dim no rule declares (an embedding's vocabulary) after
    the ops; the model's own inputs and outputs only when nothing else blocks."""
    producing = [g for g in cg.groups if any(m.role in ("out", "scale", "value") for m in g.members)]
    reasons = [g.blocked[0] for g in producing if g.blocked] + [g.inexact[0] for g in producing if g.inexact]
    ops = [r for r in reasons if not r.startswith(("model input", "model output"))]
    counted = Counter(ops or reasons).most_common()
    return [r for r, _ in sorted(counted, key=lambda rc: (not rc[0].startswith("no op rule"),
                                                           rc[0].startswith("parameter "), -rc[1]))]


def check_torch_pruning(built: zoo.Built) -> dict[str, Any]:
    """Torch-Pruning on the same model: DependencyGraph build, one 50 % MetaPruner step, a forward."""
    import torch_pruning as tp

    model, inputs, ignored = built
    rec: dict[str, Any] = {"builds": False, "prunes": False, "runs": False}
    try:
        tp.DependencyGraph().build_dependency(model, inputs, verbose=False)
        rec["builds"] = True
        pruner = tp.pruner.MetaPruner(model, inputs, importance=tp.importance.MagnitudeImportance(p=2),
                                      pruning_ratio=0.5, ignored_layers=ignored, in_channel_groups={},
                                      out_channel_groups={})
        pruner.step()
        rec["prunes"] = True
        _outputs(model, inputs)
        rec["runs"] = True
    except Exception as exc:
        rec["error"] = _reason(exc)
    return rec


def _build(suite: str, family: str, use_cache: bool | None = None) -> tuple[str, zoo.Built]:
    """The tiny model of ``family``; a family spelled ``package.module:function`` (tests) is what that function,
    called with no arguments, returns: (name, (model, inputs, ignored layers))."""
    if ":" in family:
        module, _, function = family.partition(":")
        return getattr(importlib.import_module(module), function)()
    if suite == "timm":
        return vision.build_timm(family)
    if suite == "hf":
        return zoo.build_hf(family, use_cache)
    return vision.build_torchvision(family)


def check_family(suite: str, family: str, torch_pruning: bool = True) -> dict[str, Any]:
    """The whole record of one family (in this process)."""
    import_torchvision()  # before timm / transformers, which import it
    rec: dict[str, Any] = {"family": family}
    start = time.perf_counter()
    try:
        name, built = _build(suite, family, use_cache=False)
    except zoo.NotBuilt as exc:
        return {**rec, "result": "not built", "reason": str(exc)[:300]}
    except Exception as exc:
        return {**rec, "result": "not built", "reason": _reason(exc)}
    rec["model"] = name
    rec["params"] = sum(p.numel() for p in built[0].parameters())
    if not all(bool(torch.isfinite(t).all()) for t in _outputs(built[0], built[1])):
        return {**rec, "result": "not built", "reason": "the tiny model's outputs are not finite before pruning"}
    rec.update(check_ours(built))
    if suite == "hf":
        config = built[0].config
        task, _ = zoo.hf_model_class(config)
        rec["task"] = task
        if zoo.is_decoder(task, config) and hasattr(config, "use_cache"):
            try:
                rec["use_cache"] = {k: v for k, v in check_ours(_build(suite, family, True)[1]).items()
                                    if k in ("result", "reason", "rel_error", "pruned_groups")}
            except Exception as exc:
                rec["use_cache"] = {"result": "not built", "reason": _reason(exc)}
    rec["seconds"] = round(time.perf_counter() - start, 1)
    if torch_pruning:
        print(MARK + json.dumps({**rec, "torch_pruning": {"error": "timeout"}}), flush=True)  # if TP hangs
        rec["torch_pruning"] = check_torch_pruning(_build(suite, family, use_cache=False)[1])
        rec["seconds"] = round(time.perf_counter() - start, 1)
    return rec


# ---------------------------------------------------------------------------------------------- the run
def families(suite: str) -> list[str]:
    if suite == "timm":
        return vision.timm_families()
    if suite == "hf":
        return zoo.hf_families()
    return sorted(vision.TORCHVISION)


def run_child(suite: str, family: str, timeout: float, torch_pruning: bool) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "benchmarks.coverage", "--child", "--suite", suite, "--families", family]
    if not torch_pruning:
        cmd.append("--no-torch-pruning")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                              cwd=Path(__file__).resolve().parents[1])
        stdout, stderr, status = proc.stdout, proc.stderr, f"exit status {proc.returncode}"
    except subprocess.TimeoutExpired as exc:
        stdout, stderr, status = _text(exc.stdout), "", f"no result within {timeout:.0f} s"
    for line in reversed(stdout.splitlines()):
        if line.startswith(MARK):  # the last record the child printed (ours, if Torch-Pruning hung)
            return json.loads(line[len(MARK):])
    tail = (stderr.strip().splitlines() or [status])[-1]
    return {"family": family, "result": "timeout" if not stderr else "crash", "reason": tail[:300]}


def _text(value: str | bytes | None) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else (value or "")


def totals(records: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Counts over the families; sub-configs (``sub_config_of``: a part of another family) are not counted."""
    families = [r for r in records.values() if not r.get("sub_config_of")]
    counts = Counter(r["result"] for r in families)
    built = [r for r in families if r["result"] != "not built"]
    tp = [r.get("torch_pruning", {}) for r in built]
    return {"families": len(families), "built": len(built), "results": dict(counts),
            "exact_share_of_built": round(counts["exact"] / len(built), 4) if built else None,
            "oracle_failures": counts["FAIL"], "sub_configs": len(records) - len(families),
            "torch_pruning": {k: sum(bool(t.get(k)) for t in tp) for k in ("builds", "prunes", "runs")},
            **determinism_totals(families)}


def determinism_totals(records: list[dict[str, Any]]) -> dict[str, Any]:
    """``deterministic``: the families checked by ``--determinism``, those whose graph was the same, and the
    names of the others (none when not run)."""
    checked = [r for r in records if r.get("deterministic") is not None]
    if not checked:
        return {}
    return {"deterministic": {"checked": len(checked), "same": sum(r["deterministic"] for r in checked),
                              "differ": [r["family"] for r in checked if not r["deterministic"]]}}


def with_torch_pruning_of(old: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    """``new``, with the Torch-Pruning result of ``old`` when ``new`` was run without it (``--no-torch-pruning``)
    on the same tiny model (same class and parameter count): a re-run of ours keeps the comparison."""
    if old is None or "torch_pruning" in new or "torch_pruning" not in old or "model" not in new:
        return new
    if (old.get("model"), old.get("params")) != (new["model"], new.get("params")):
        return new
    return {**new, "torch_pruning": old["torch_pruning"]}


def tag_sub_configs(records: dict[str, dict[str, Any]]) -> None:
    """Mark every Hugging Face record that is a sub-config (``coverage_models.hf_sub_config_of``) with its parent."""
    for family, rec in records.items():
        parent = zoo.hf_sub_config_of(family)
        if parent:
            rec["sub_config_of"] = parent
        else:
            rec.pop("sub_config_of", None)


def sub_config_record(family: str, parent: str) -> dict[str, Any]:
    return {"family": family, "result": "sub-config", "sub_config_of": parent,
            "reason": f"sub-config of {parent}: no auto class of any task, checked as a part of {parent}"}


def write(out: Path, suite: str, command: str, records: dict[str, dict[str, Any]]) -> None:
    if suite == "hf":
        tag_sub_configs(records)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"suite": suite, "command": command, "date": date.today().isoformat(),
                               "machine": _machine(), "rel_tol": REL_TOL, "totals": totals(records),
                               "models": dict(sorted(records.items()))}, indent=1) + "\n")


def _machine() -> dict[str, Any]:
    from importlib.metadata import version

    versions = {}
    for pkg in ("torch", "timm", "transformers", "torchvision", "torch-pruning"):
        try:
            versions[pkg] = version(pkg)
        except Exception:
            versions[pkg] = None
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "python": platform.python_version(), **versions}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", choices=SUITES, required=True)
    parser.add_argument("--families", default="", help="comma-separated families (default: all of the suite)")
    parser.add_argument("--task", default="", help="Hugging Face: only model types whose first task head is this "
                        "(causal_lm, masked_lm, seq_to_seq_causal_lm, image_classification, ...)")
    parser.add_argument("--limit", type=int, default=0, help="at most this many families not yet in --out")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--jobs", type=int, default=1, help="subprocesses at a time")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per family")
    parser.add_argument("--redo", action="store_true", help="re-run families already in --out")
    parser.add_argument("--no-torch-pruning", action="store_true")
    parser.add_argument("--merge", type=Path, default=None, help="run nothing: copy the records of this JSON "
                        "(only --families, if given) into --out, re-read right before writing")
    parser.add_argument("--determinism", action="store_true", help="no oracle: build each family's graph in "
                        "fresh subprocesses, compare with the recorded signature (benchmarks.coverage_determinism)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    if args.child and args.determinism:
        from benchmarks import coverage_determinism

        print(MARK + json.dumps(coverage_determinism.graph_rows(args.suite, args.families)), flush=True)
        return 0
    if args.child:
        print(MARK + json.dumps(check_family(args.suite, args.families, not args.no_torch_pruning)), flush=True)
        return 0
    out = args.out or Path(f"benchmarks/results/coverage_{args.suite}.json")
    data = json.loads(out.read_text()) if out.exists() else {}
    records: dict[str, dict[str, Any]] = data.get("models", {})
    shown = [f"<{len(a.split(','))} families>" if a.count(",") > 8 else a for a in (argv or sys.argv[1:])]
    if args.determinism:
        from benchmarks import coverage_determinism

        return coverage_determinism.run(args.suite, out, args.families.split(",") if args.families else None,
                                        args.jobs, args.timeout, "python -m benchmarks.coverage " + " ".join(shown),
                                        args.redo)
    runs = [data["command"]] if data.get("command") else []  # every run that wrote this file, in order
    if args.merge:
        merged = json.loads(args.merge.read_text())
        wanted = set(args.families.split(",")) if args.families else set(merged["models"])
        records.update({f: with_torch_pruning_of(records.get(f), r)
                        for f, r in merged["models"].items() if f in wanted})
        write(out, args.suite, "; ".join([*runs, merged.get("command", str(args.merge))]), records)
        print(json.dumps(totals(records), indent=1))
        return 0
    todo = args.families.split(",") if args.families else families(args.suite)
    todo = [f for f in todo if args.redo or f not in records]
    if args.task:
        todo = [f for f in todo if zoo.hf_task_of(f) == args.task]
    if args.suite == "hf":  # sub-configs are recorded, not run
        parents = {f: zoo.hf_sub_config_of(f) for f in todo}
        records.update({f: sub_config_record(f, p) for f, p in parents.items() if p})
        todo = [f for f in todo if not parents[f]]
        if any(parents.values()):
            write(out, args.suite, "; ".join([*runs, "python -m benchmarks.coverage " + " ".join(shown)]), records)
    todo = todo[: args.limit] if args.limit else todo
    command = "; ".join([*runs, "python -m benchmarks.coverage " + " ".join(shown)])

    def one(family: str) -> dict[str, Any]:
        return run_child(args.suite, family, args.timeout, not args.no_torch_pruning)

    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        for rec in pool.map(one, todo):
            records[rec["family"]] = with_torch_pruning_of(records.get(rec["family"]), rec)
            print(f"{rec['family']:<40} {rec['result']:<10} {rec.get('rel_error', '')!s:<10} "
                  f"{rec.get('reason', '')[:100]}", flush=True)
            write(out, args.suite, command, records)
    print(json.dumps(totals(records), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
