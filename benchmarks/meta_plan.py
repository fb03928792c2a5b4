"""Plan pruning of a LLaMA-7B-shaped model on the meta device: time per phase and peak RSS.

Each measurement runs in a fresh subprocess so that its peak RSS (``resource.getrusage``) is its
own. Children:

* ``export``: ``torch.export.export`` of the meta model alone (the floor for any export-based tracer);
* ``plan``: build the meta model, trace (fx attempt + torch.export + one meta forward for shapes),
  collect op-rule facts, group channels, costs + budget (``make_plan``), then prune the meta model's
  architecture to the plan (``apply_plan(importance='index')``: exact parameter count after);
  finally Torch-Pruning's ``DependencyGraph`` on the same meta model (after our numbers are taken);
* ``apply``: the plan (as JSON) applied to a real small LLaMA with the same 32 layer names
  (hidden 128, MLP 344, 4/2 heads), keep ratios, magnitude and Wanda importance.

    python -m benchmarks.meta_plan --out /tmp/meta_plan.json [--layers 32 --hidden 4096 --mlp 11008]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

START = time.perf_counter()


def _rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB on Linux


def _config(args: argparse.Namespace, hidden: int, mlp: int, heads: int, kv: int) -> Any:
    import transformers

    return transformers.LlamaConfig(hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=args.layers,
                                    num_attention_heads=heads, num_key_value_heads=kv, vocab_size=args.vocab,
                                    use_cache=False)


def _meta_model(args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    import torch
    import transformers

    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(_config(args, args.hidden, args.mlp, args.heads, args.kv_heads))
    return model.eval(), {"input_ids": torch.zeros(1, args.seq, dtype=torch.long, device="meta")}


def child_export(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from sparsify._compat import import_torchvision

    import_torchvision()
    out: dict[str, Any] = {"import_s": time.perf_counter() - START}
    clock = time.perf_counter()
    model, ids = _meta_model(args)
    out["build_meta_model_s"] = time.perf_counter() - clock
    clock = time.perf_counter()
    torch.export.export(model, (), kwargs=ids, strict=False)
    out["torch_export_s"] = time.perf_counter() - clock
    out["peak_rss_gb"] = _rss_gb()
    return out


def child_plan(args: argparse.Namespace) -> dict[str, Any]:
    from sparsify._compat import import_torchvision

    import_torchvision()
    import sparsify.graph.trace as trace_mod
    from sparsify.graph import channel_graph
    from sparsify.graph.collect import collect_facts
    from sparsify.oneshot import apply_plan, make_plan

    out: dict[str, Any] = {"import_s": time.perf_counter() - START}
    export = trace_mod._export
    phases: dict[str, float] = {}

    def timed_export(*a: Any, **k: Any) -> Any:
        clock = time.perf_counter()
        try:
            return export(*a, **k)
        finally:
            phases["export_s"] = time.perf_counter() - clock

    trace_mod._export = timed_export  # only to split the trace time into export and the shape pass
    clock = time.perf_counter()
    model, ids = _meta_model(args)
    out["build_meta_model_s"] = time.perf_counter() - clock
    clock = time.perf_counter()
    traced = trace_mod.trace(model, ids)
    out["trace_s"] = time.perf_counter() - clock
    out["trace_export_s"] = phases["export_s"]
    out["trace_fx_attempt_and_shapes_s"] = out["trace_s"] - phases["export_s"]
    clock = time.perf_counter()
    facts = collect_facts(traced)
    out["collect_s"] = time.perf_counter() - clock
    clock = time.perf_counter()
    channel_graph._couple_shared_members(facts)
    graph, groups = channel_graph._group(facts)
    cg = channel_graph.ChannelGraph(traced, facts, graph, groups)
    out["group_s"] = time.perf_counter() - clock
    timings: dict[str, float] = {}
    plan = make_plan(model, ids, args.sparsity, unit=args.unit, budget=args.budget, graph=cg, timings=timings)
    out["costs_and_budget_s"] = timings["budget"]
    out["plan_total_s"] = sum(out[k] for k in ("build_meta_model_s", "trace_s", "collect_s", "group_s",
                                                "costs_and_budget_s"))
    out["peak_rss_gb_after_plan"] = _rss_gb()
    Path(args.plan_path).write_text(plan.to_json())
    params_before = sum(p.numel() for p in model.parameters())
    clock = time.perf_counter()
    result = apply_plan(model, ids, plan, importance="index", graph=cg)
    out["prune_meta_architecture_s"] = time.perf_counter() - clock
    out["params_before"] = params_before
    out["params_after"] = sum(p.numel() for p in model.parameters())
    out["groups"] = {"total": len(cg.groups), "prunable": len(cg.prunable_groups()), "planned": len(plan.groups),
                     "kinds": sorted({g.kind for g in cg.prunable_groups()})}
    out["mlp_width_after"] = int(model.model.layers[0].mlp.down_proj.in_features)
    out["pruned_groups"] = len(result.removed)
    out["peak_rss_gb"] = _rss_gb()
    if args.torch_pruning:
        out["torch_pruning"] = _torch_pruning(args)
    return out


def _torch_pruning(args: argparse.Namespace) -> str:
    try:
        import torch_pruning as tp
    except ImportError:
        return "not installed"
    model, ids = _meta_model(args)
    try:
        tp.DependencyGraph().build_dependency(model, example_inputs=ids)
    except Exception as exc:  # we report what it says
        return f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    return "built a dependency graph"


def child_apply(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import transformers

    from sparsify._compat import import_torchvision

    import_torchvision()
    from sparsify.oneshot import WidthPlan, apply_plan

    plan = WidthPlan.from_json(Path(args.plan_path).read_text())
    out: dict[str, Any] = {}
    for importance in ("magnitude", "activation"):
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(_config(args, 128, 344, 4, 2)).eval()
        ids = {"input_ids": torch.randint(0, args.vocab, (2, 16))}
        calib = [{"input_ids": torch.randint(0, args.vocab, (2, 16))} for _ in range(4)]
        before = sum(p.numel() for p in model.parameters())
        clock = time.perf_counter()
        result = apply_plan(model, ids, plan, importance=importance, match="ratio",
                            calibration=calib if importance == "activation" else None)
        out[importance] = {"apply_s": time.perf_counter() - clock, "params_before": before,
                           "params_after": sum(p.numel() for p in model.parameters()),
                           "mlp_width_after": int(model.model.layers[0].mlp.down_proj.in_features),
                           "groups_pruned": len(result.removed)}
        with torch.no_grad():
            model(**ids)  # the pruned model runs
    out["peak_rss_gb"] = _rss_gb()
    return out


def _run_child(name: str, argv: list[str]) -> dict[str, Any]:
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.meta_plan", "--child", name, *argv],
                          capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        return {"error": proc.stderr[-2000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--mlp", type=int, default=11008)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq", type=int, default=8)
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--unit", default="params", choices=["channels", "params", "macs"])
    p.add_argument("--budget", default="uniform", choices=["uniform", "erk"])
    p.add_argument("--no-torch-pruning", dest="torch_pruning", action="store_false")
    p.add_argument("--plan-path", default="/tmp/meta_plan_plan.json")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        fn = {"export": child_export, "plan": child_plan, "apply": child_apply}[args.child]
        print(json.dumps(fn(args)))
        return
    argv = [a for a in sys.argv[1:]]
    results: dict[str, Any] = {"machine": {"python": platform.python_version(), "cpu": platform.processor(),
                                           "cores": os.cpu_count()}, "args": vars(args)}
    for name in ("export", "plan", "apply"):
        results[name] = _run_child(name, argv)
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"LLaMA-7B-shaped meta model ({args.layers} layers, hidden {args.hidden}, MLP {args.mlp})")
    t.add_column("phase")
    t.add_column("value", justify="right")
    for name in ("export", "plan", "apply"):
        for key, value in results[name].items():
            if isinstance(value, float):
                t.add_row(f"{name}: {key}", f"{value:.3f}")
            elif isinstance(value, dict):
                t.add_row(f"{name}: {key}", json.dumps(value)[:90])
            else:
                t.add_row(f"{name}: {key}", str(value)[:90])
    Console().print(t)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
