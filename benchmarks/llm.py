"""Prune the trained LM with every method at 25 % and 50 % fewer parameters, recover briefly, measure (issue #20).

    python -m benchmarks.llm --model-dir out/lm/llama --out out/llm --device cuda --max-minutes 7
    python -m benchmarks.llm --report --out out/llm --results-json benchmarks/results/llm_llama.json

Methods (``--methods``): sparsify width pruning with the ``activation`` (Wanda), ``magnitude``
(filter_norm), ``taylor`` (LLM-Pruner) and ``fluctuation`` (FLAP, bias compensation) importances;
``depth`` (block influence of attention / MLP sub-blocks, whole layers where both go); ``experts``
(MoE models only, also at "half the experts"); Torch-Pruning's ``tp_magnitude`` and ``tp_taylor``;
``modelopt`` (NVIDIA ModelOpt FastNAS, when installed). Parameters are counted once per tensor,
embedding included (tied with the LM head); a run meets its target within 1 %. Each (method, target)
is pruned one-shot from the dense model, measured (held-out perplexity; forward tokens/s in bf16 on
CUDA, median after warm-up, timed with CUDA events; peak CUDA memory of that copy), then recovered by
``--recovery-steps`` of distillation from the dense teacher (default: the most steps within 2 % of
the pretraining tokens in ``training.json``) and measured again. A run that would end past
``--max-minutes`` is skipped and recorded as such. One JSON per (method, target, phase) goes to
``--out``; the report is a table of them.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.llm_lib.budget import (
    RECOVERY_FRACTION,
    count_params,
    pretraining_tokens,
    recovery_steps,
    target_params,
    within,
)
from benchmarks.llm_lib.ours import Calibration
from sparsify.lm.distill import distill

OURS = ("activation", "magnitude", "taylor", "fluctuation", "depth", "experts", "hidden")
PEERS = ("tp_magnitude", "tp_taylor", "modelopt")
DEFAULT_METHODS = ("activation", "magnitude", "depth", "tp_magnitude", "taylor", "fluctuation", "tp_taylor",
                   "experts", "modelopt")  # the sweep's order: --max-minutes skips what does not fit, last first


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", type=Path, default=Path("out/lm/llama"), help="save_pretrained folder of llm_train")
    p.add_argument("--corpus", type=Path, default=Path("lmdata/corpus"))
    p.add_argument("--out", type=Path, default=Path("out/llm"))
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS), help=f"comma list of {OURS + PEERS}")
    p.add_argument("--targets", default="0.25,0.5", help="fractions of fewer parameters")
    p.add_argument("--recovery-steps", type=int, default=None,
                   help="default: the most steps within --recovery-fraction of training.json's tokens_seen")
    p.add_argument("--recovery-fraction", type=float, default=RECOVERY_FRACTION,
                   help="recovery budget as a fraction of the pretraining tokens (the issue: at most 2 %%)")
    p.add_argument("--recovery-lr", type=float, default=3e-4)
    p.add_argument("--recovery-batch", type=int, default=16)
    p.add_argument("--recovery-schedule", choices=("constant", "cosine"), default="cosine",
                   help="cosine: linear warm-up (--recovery-warmup steps), then decay to 0.1 of --recovery-lr")
    p.add_argument("--recovery-warmup", type=int, default=10)
    p.add_argument("--round-to", type=int, default=8,
                   help="width methods: MLP widths kept at multiples of it (1: off; odd widths are slow in bf16)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--calib-windows", type=int, default=32, help="calibration windows of the train split")
    p.add_argument("--calib-batch", type=int, default=8)
    p.add_argument("--eval-windows", type=int, default=128, help="held-out windows scored (0: all)")
    p.add_argument("--eval-batch", type=int, default=16)
    p.add_argument("--throughput-batch", type=int, default=64, help="sequences per timed forward (tokens/s)")
    p.add_argument("--tp-timeout", type=float, default=90.0, help="seconds before a Torch-Pruning run is abandoned")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--max-minutes", type=float, default=7.0, help="stop before starting a run that may not end in time")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--report", action="store_true", help="only tabulate the JSONs already in --out")
    p.add_argument("--results-json", type=Path, default=None, help="default: benchmarks/results/llm_<model>.json")
    p.add_argument("--markdown", type=Path, default=None, help="default: <out>/report.md")
    return p


def windows(tokens: np.ndarray, seq_len: int, count: int, seed: int) -> torch.Tensor:
    """``count`` non-overlapping windows of ``seq_len`` tokens, drawn at random (seeded)."""
    n = len(tokens) // seq_len
    order = np.random.default_rng(seed).permutation(n)[:count]
    stream = torch.from_numpy(tokens[: n * seq_len].astype(np.int64)).view(n, seq_len)
    return stream[torch.from_numpy(np.sort(order))]


def load_model(model_dir: Path, device: torch.device) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.config.use_cache = False
    return model.to(device).eval()


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def measure(model: torch.nn.Module, heldout: torch.Tensor, args: argparse.Namespace) -> dict[str, Any]:
    from sparsify.lm.evaluate import peak_memory, perplexity, throughput

    device = next(model.parameters()).device
    with autocast(device):
        ppl = perplexity(model, heldout, seq_len=args.seq_len, batch_size=args.eval_batch)
    cuda = device.type == "cuda"
    if cuda:  # the teacher and the fp32 student stay on the device: count only what the bf16 copy adds
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
    fast = copy.deepcopy(model).to(torch.bfloat16) if cuda else model
    iters, warmup = (20, 5) if cuda else (2, 1)
    speed = throughput(fast, batch_size=args.throughput_batch, seq_len=args.seq_len, iters=iters, warmup=warmup)
    memory = peak_memory(fast, batch_size=args.throughput_batch, seq_len=args.seq_len)
    del fast
    peak = None if memory["peak_bytes"] is None else memory["peak_bytes"] - before
    return {"ppl": ppl["ppl"], "nll": ppl["nll"], "eval_tokens": ppl["tokens"],
            "tokens_per_s": speed["forward_tokens_per_s"], "forward_ms": speed["forward_ms"],
            "throughput_tokens": args.throughput_batch * args.seq_len, "peak_bytes": peak,
            "weight_bytes": memory["weight_bytes"]}


def prune(method: str, model: torch.nn.Module, calibration: Calibration, target: int,
          args: argparse.Namespace) -> dict[str, Any]:
    from benchmarks.llm_lib import ours

    if method in ours.WIDTH:
        return ours.width(model, calibration, target, method, round_to=args.round_to)
    if method == "depth":
        return ours.depth(model, calibration, target)
    if method == "experts":
        return ours.experts(model, calibration, target)
    if method == "hidden":  # residual-stream channels, least-squares compensation (benchmarks/llm_lib/hidden.py)
        from benchmarks.llm_lib.hidden import hidden
        return hidden(model, calibration, target)
    from benchmarks.llm_lib import peers

    if method in ("tp_magnitude", "tp_taylor"):
        return peers.torch_pruning(model, calibration, target, method.removeprefix("tp_"), timeout_s=args.tp_timeout)
    if method == "modelopt":
        return peers.modelopt(model, calibration, target)
    raise ValueError(f"unknown method {method!r}; choose from {OURS + PEERS}")


def recover(student: torch.nn.Module, teacher: torch.nn.Module, train: np.ndarray,
            args: argparse.Namespace) -> dict[str, Any]:
    """``--recovery-steps`` of distillation from the dense teacher (plain LM loss if distill is missing)."""
    device = next(student.parameters()).device
    data = windows(train, args.seq_len, args.recovery_steps * args.recovery_batch, args.seed + 1)
    batches = [{"input_ids": b.to(device)} for b in data.split(args.recovery_batch)]
    student.train()
    start = time.perf_counter()
    log = distill(student, teacher, batches, steps=len(batches), lr=args.recovery_lr, schedule=args.recovery_schedule,
                  warmup_steps=min(args.recovery_warmup, len(batches) - 1), min_lr_ratio=0.1)
    how, last = f"distill (KL from the dense teacher, T=2, {args.recovery_schedule} lr {args.recovery_lr:g})", \
        log[-1]["loss"]
    student.eval()
    used = sum(b["input_ids"].numel() for b in batches)
    return {"recovery": how, "recovery_steps": len(batches), "recovery_tokens": used,
            "recovery_fraction_of_pretraining": used / args.pretraining_tokens if args.pretraining_tokens else None,
            "recovery_s": time.perf_counter() - start, "recovery_final_loss": last}


def write(out: Path, record: dict[str, Any]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{record['method']}_{round(100 * record['target']):02d}_{record['phase']}.json"
    path.write_text(json.dumps(record, indent=1, default=float) + "\n")
    return path


def run_one(method: str, fewer: float, dense: torch.nn.Module, dense_params: dict[str, int],
            calibration: Calibration, heldout: torch.Tensor, train: np.ndarray,
            args: argparse.Namespace, label: str | None = None) -> list[dict[str, Any]]:
    target = target_params(dense_params["total"], fewer)
    base = {"method": method, "target": fewer, "target_params": target, "dense_params": dense_params["total"],
            "target_kind": label or f"{fewer:.0%} fewer parameters"}
    model = copy.deepcopy(dense)  # the student; the dense model stays frozen as the teacher
    for p in model.parameters():
        p.requires_grad_(True)
    try:
        info = prune(method, model, calibration, target, args)
        with torch.no_grad():
            model(**calibration.example)  # the pruned model runs
    except Exception as error:  # a method that cannot run here is a result too: recorded, not fatal
        record = {**base, "phase": "oneshot", "status": "failed", "error": f"{type(error).__name__}: {error}"[:600]}
        print(f"  {method} @ {fewer:.0%}: FAILED {record['error'][:200]}")
        return [record]
    params = count_params(model)
    common = {**base, **info, "params": params["total"], "non_embedding_params": params["non_embedding"],
              "embedding_params": params["embedding"], "target_met": within(params["total"], target),
              "status": "ok"}
    records = [{**common, "phase": "oneshot", **measure(model, heldout, args)}]
    print(f"  {method} @ {fewer:.0%}: {params['total']:,} params (target {target:,}), "
          f"ppl {records[0]['ppl']:.2f}, prune {info['prune_s']:.2f}s")
    if args.recovery_steps > 0:
        recovery = recover(model, dense, train, args)
        records.append({**common, "phase": "recovered", **recovery, **measure(model, heldout, args)})
        print(f"    after {recovery['recovery_steps']} recovery steps: ppl {records[1]['ppl']:.2f}")
    del model
    return records


def half_experts(dense: torch.nn.Module) -> float | None:
    """The fraction of fewer parameters that removing half the experts of every MoE layer gives (None: no MoE)."""
    from sparsify.errors import SparsifyError
    from sparsify.hf.experts import moe_layers

    try:
        layers = moe_layers(dense)
    except SparsifyError:  # not a mixture of experts: ``experts`` fails at its targets and says why
        return None
    if not layers:
        return None
    per_expert = sum(p.numel() for p in layers[0].experts.parameters()) // layers[0].num_experts
    removed = sum(m.num_experts // 2 for m in layers) * per_expert
    return removed / count_params(dense)["total"]


def plan_runs(methods: list[str], targets: list[float], dense: torch.nn.Module) -> list[tuple[str, float, str]]:
    """(method, fraction, label) in sweep order: every method at every target; ``experts`` also at half the experts."""
    runs = [(m, t, f"{t:.0%} fewer parameters") for m in methods for t in targets]
    half = half_experts(dense) if "experts" in methods else None
    if half is not None:
        at = max(i for i, run in enumerate(runs) if run[0] == "experts") + 1
        runs.insert(at, ("experts", half, "half the experts"))
    return runs


def skipped(method: str, fewer: float, label: str, reason: str) -> dict[str, Any]:
    return {"method": method, "target": fewer, "target_kind": label, "phase": "oneshot", "status": "skipped",
            "error": reason}


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from benchmarks.llm_lib.report import report

    if args.report:
        report(args.out, args.results_json, args.markdown)
        return 0
    clock = time.perf_counter()
    from benchmarks.llm_lib.tokens import load_tokens

    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    tokens = load_tokens(args.corpus)
    dense = load_model(args.model_dir, device)
    for p in dense.parameters():
        p.requires_grad_(False)
    args.pretraining_tokens = pretraining_tokens(args.model_dir)
    if args.recovery_steps is None:
        args.recovery_steps = recovery_steps(args.pretraining_tokens, args.recovery_batch, args.seq_len,
                                             args.recovery_fraction)
    recovery_tokens = args.recovery_steps * args.recovery_batch * args.seq_len
    print(f"recovery: {args.recovery_steps} steps = {recovery_tokens:,} tokens"
          + (f" = {recovery_tokens / args.pretraining_tokens:.2%} of the {args.pretraining_tokens:,} pretraining "
             "tokens" if args.pretraining_tokens else " (no tokens_seen in training.json)"))
    calib = windows(tokens["train"], args.seq_len, args.calib_windows, args.seed).to(device)
    calibration = Calibration(
        batches=[{"input_ids": b} for b in calib.split(args.calib_batch)], example={"input_ids": calib[:1, :64]},
        labeled=[{"input_ids": b, "labels": b} for b in calib.split(args.calib_batch)])
    heldout = torch.from_numpy(tokens["heldout"].astype(np.int64))
    if args.eval_windows:
        heldout = heldout[: args.eval_windows * args.seq_len]
    dense_params = count_params(dense)
    meta = {"model_dir": str(args.model_dir), "model_type": dense.config.model_type, "device": str(device),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "seq_len": args.seq_len, "calib_windows": args.calib_windows, "eval_windows": args.eval_windows,
            "pretraining_tokens": args.pretraining_tokens, "recovery_steps": args.recovery_steps,
            "recovery_tokens": recovery_tokens, "recovery_fraction": args.recovery_fraction,
            "throughput_batch": args.throughput_batch, "max_minutes": args.max_minutes,
            "round_to": args.round_to, "recovery_schedule": args.recovery_schedule, "recovery_lr": args.recovery_lr,
            "torch": torch.__version__}
    write(args.out, {"method": "dense", "target": 0.0, "phase": "oneshot", "status": "ok",
                     "params": dense_params["total"], "non_embedding_params": dense_params["non_embedding"],
                     "embedding_params": dense_params["embedding"], "meta": meta, **measure(dense, heldout, args)})
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    targets = [float(t) for t in args.targets.split(",")]
    took: dict[str, float] = {}  # seconds of each method's last run: the estimate of its next one
    skips = []
    for method, fewer, label in plan_runs(methods, targets, dense):
        elapsed = time.perf_counter() - clock
        estimate = took.get(method, max(took.values(), default=0.0))
        if elapsed + 1.2 * estimate > 60 * args.max_minutes:
            reason = (f"skipped by --max-minutes {args.max_minutes}: {elapsed:.0f}s used, this run was estimated at "
                      f"{estimate:.0f}s")
            print(f"  {method} @ {label}: {reason}")
            write(args.out, {**skipped(method, fewer, label, reason), "meta": meta})
            skips.append(f"{method} @ {label}")
            continue
        start = time.perf_counter()
        for record in run_one(method, fewer, dense, dense_params, calibration, heldout, tokens["train"], args, label):
            write(args.out, {**record, "meta": meta})
        took[method] = time.perf_counter() - start
    report(args.out, args.results_json, args.markdown)
    print(f"done in {time.perf_counter() - clock:.0f}s" + (f"; skipped: {', '.join(skips)}" if skips else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
