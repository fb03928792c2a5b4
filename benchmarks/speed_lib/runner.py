"""One model of the speed benchmark: deployment modes on dense, the pick, every arm timed in that mode.

Order of work (a time budget skips what does not fit, in this order from the end, and says so in the row;
dense is always timed, since every ratio needs it, and an arm under way when the budget runs out finishes,
the next is skipped): dense in every ``--modes`` mode → the pick (fastest on dense among the modes whose
set-up fits the arms) → the first MACs target's arms → the latency targets → the other MACs targets →
``--reference-modes`` (timed on dense only, e.g. compile modes too slow to set up for every arm). Every timed
network gets ``--repeat`` separately built timings at the main batch, one at each ``--small-batches`` size
(with cuDNN's heuristics unless ``--small-batch-autotune``: its autotuner is noisy and slower there) and,
with ``--profile``, the diagnostics. ``--small-batch-guard``: a latency-target network slower than dense at a
small batch is searched again at twice the ``round_to`` (:func:`choose_guarded` keeps one).
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from rich.console import Console
from torch import nn

from benchmarks.speed_lib import diagnostics
from benchmarks.speed_lib.arms import latency_arm, prune_latency, prune_latency_target, prune_ours, target_arm
from benchmarks.speed_lib.deployment import MODES, Deployed, Mode, measure_fn, pick_mode
from benchmarks.speed_lib.models import DEFAULT_RATIOS, build, macs, params_m, unaligned
from benchmarks.speed_lib.report import Row, fill_ratios
from benchmarks.speed_lib.tp_arm import prune_tp
from sparsify.measure.cudnn import cudnn_autotune


class Clock:
    """Seconds left of the run's ``--time-budget`` (inf without one)."""

    def __init__(self, budget_s: float | None) -> None:
        self.start, self.budget = time.perf_counter(), budget_s

    def left(self) -> float:
        return float("inf") if self.budget is None else self.budget - (time.perf_counter() - self.start)


def arm_list(name: str, args: argparse.Namespace) -> list[tuple[str, bool]]:
    """(arm, rounded) per MACs target, in the issue's order."""
    vit = name.startswith("vit")
    arms = [("ours", False), ("ours+round", True)] + [(latency_arm(w), True) for w in args.latency_weights]
    if vit and args.vit_heads:
        arms.append(("ours+latency+heads", True))
    arms += [("tp", False), ("tp+round", True)]
    wanted = args.arms or ["ours+round", *(latency_arm(w) for w in args.latency_weights), "ours+latency+heads",
                           "tp", "tp+round"]
    return [a for a in arms if a[0] in wanted and not (a[0].startswith("tp") and args.no_tp)]


def _time_network(model: nn.Module, x: torch.Tensor, mode: Mode, batch: int, args: argparse.Namespace,
                  row: Row, profile: bool) -> Deployed:
    deployed = Deployed(model, x, mode, args)
    row.timing = deployed.time(batch)
    row.ms = row.timing["ms"]
    row.ms_repeats = [row.ms] + [deployed.time(batch)["ms"] for _ in range(args.repeat - 1)]
    autotune = getattr(args, "small_batch_autotune", False) and not getattr(args, "no_cudnn_benchmark", False)
    with cudnn_autotune(autotune):  # small batches: cuDNN's heuristics (sparsify.measure.cudnn says why)
        for b in args.small_batches:
            row.small_batch_ms[str(b)] = deployed.time(b)["ms"]
    if profile:
        row.info.update(diagnostics.kinds(deployed.runner(batch), deployed.device))
    return deployed


def _in_network(model: nn.Module, x: torch.Tensor, mode: Mode, batch: int, args: argparse.Namespace,
                alone: dict[str, float]) -> dict[str, Any]:
    """Layers alone (``alone``) against the same layers inside the eager deployed network."""
    eager = Deployed(copy.deepcopy(model), x, Mode("eager", cast_params=mode.cast_params), args)
    inside = diagnostics.layer_times_in_network(eager.module, eager.runner(batch), list(alone), eager.device)
    return diagnostics.alone_vs_network(alone, inside, eager.time(batch)["ms"])


def bench_model(name: str, args: argparse.Namespace, round_to: int, rows: list[Row], console: Console,
                clock: Clock, seconds: float, on_row: Callable[[], None] | None = None) -> dict[str, Any]:
    """Benchmark ``name`` within ``seconds`` (its share of the budget); rows appended (``on_row()`` after each,
    e.g. to save them: a command cut short keeps what it measured); returns the mode report.

    An arm starts only while time is left; a latency-target arm only if the time left covers the longest one
    so far (ViT-B/16's took 100-200 s each on the H200, and one started near the end ran past the budget)."""
    deadline = time.perf_counter() + seconds
    longest_target = [0.0]
    vit = name.startswith("vit")
    batch = args.vit_batch if vit else args.batch
    dense = build(name, args.size)
    x = torch.randn(1, 3, args.size, args.size)
    dense_macs = macs(dense, x)
    modes: dict[str, dict[str, Any]] = {}
    for m in args.modes:
        try:
            d = Deployed(copy.deepcopy(dense), x, MODES[m], args)
            t = d.time(batch)
            modes[m] = {**t, "setup_s": round(d.deploy_s + t["wall_s"], 2)}
            console.log(f"{name} dense, {m}: {t['ms']:.3f} ms ({t.get('method', '')}), set-up {modes[m]['setup_s']} s")
        except Exception as exc:  # a mode that fails (compile on an odd setup) is recorded, the others still run
            modes[m] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"}
            console.log(f"{name} dense, {m}: FAILED {modes[m]['error']}")
    arms = arm_list(name, args)
    ratios = args.ratios or DEFAULT_RATIOS.get(name, [2.0])
    targets = [] if args.no_latency_targets else args.latency_targets
    networks = 1 + len(arms) * len(ratios) + len(targets) * (1 + args.latency_iterations)
    picked, why = pick_mode(modes, networks, deadline - time.perf_counter())
    mode = MODES[picked]
    uncompiled = {m: t for m, t in modes.items() if "ms" in t and not MODES[m].compiled}
    measure_mode = MODES[picked if not mode.compiled or not uncompiled else min(uncompiled,
                                                                               key=lambda m: uncompiled[m]["ms"])]
    args = argparse.Namespace(**{**vars(args), "cast_params": mode.cast_params})  # latency models time as deployed
    report = {"modes": modes, "picked": picked, "why": why, "latency_target_measure_mode": measure_mode.name}
    console.log(f"{name}: deployment {picked} ({why})")

    def add(row: Row) -> None:
        rows.append(row)
        if on_row is not None:
            on_row()

    dense_row = Row(name, None, "dense", mode=picked, macs_g=dense_macs / 1e9, reduction=1.0,
                    params_m=params_m(dense), info={"widths_not_multiple_of_8": unaligned(dense)})
    _time_network(copy.deepcopy(dense), x, mode, batch, args, dense_row, args.profile)
    fill_ratios(dense_row, dense_row)
    add(dense_row)
    console.log(f"{name}: dense {dense_row.ms:.3f} ms, {dense_macs / 1e9:.3f} GMACs")
    caches: dict[bool, dict] = {False: {}, True: {}}  # layer configurations timed, shared between targets
    dense_alone: dict[str, Any] = {}

    def run_arm(row: Row, prune: Callable[[], tuple[nn.Module, dict[str, Any]]]) -> None:
        left = min(deadline - time.perf_counter(), clock.left() - args.reserve_s)
        latency_target = "target_speedup" in row.info
        if left <= 0 or (latency_target and left < longest_target[0]):
            row.error = "skipped: over the time budget"
            add(row)
            console.log(f"{name} {row.arm}: {row.error}")
            return
        begun = time.perf_counter()
        try:
            start = time.perf_counter()
            model, row.info = prune()
            row.prune_s = time.perf_counter() - start
            alone = row.info.pop("_layers_alone", None)
            m = macs(model, x)
            row.macs_g, row.reduction, row.params_m = m / 1e9, dense_macs / m, params_m(model)
            row.info["widths_not_multiple_of_8"] = unaligned(model)
            _time_network(model, x, mode, batch, args, row, args.profile)
            fill_ratios(row, dense_row)
            if args.profile and alone:
                if not dense_alone:
                    dense_alone.update(_in_network(dense, x, mode, batch, args, alone["dense"]))
                    dense_row.info["layers_alone_vs_network"] = dense_alone
                pruned = _in_network(model, x, mode, batch, args, alone["pruned"])
                row.info["layers_alone_vs_network"] = {**pruned, "saving": diagnostics.saving(dense_alone, pruned)}
            console.log(f"{name} {_label(row)}: {row.ms:.3f} ms, MACs {row.reduction:.2f}×, "
                        f"speedup {row.speedup:.2f}×, realised {row.realised:.2f}")
        except Exception as exc:  # one failing arm is reported, the others still run
            row.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
            console.log(f"{name} {_label(row)}: FAILED {row.error}")
        if latency_target:
            longest_target[0] = max(longest_target[0], time.perf_counter() - begun)
        add(row)

    def macs_arms(ratio: float) -> None:
        for arm, rounded in arms:
            rt = round_to if rounded else None
            row = Row(name, ratio, arm, rt, mode=picked)
            if arm == "ours+latency+heads":
                run_arm(row, partial(prune_latency, dense, x, ratio, rt, batch, args, caches[True], heads=True))
            elif arm.startswith("ours+latency"):
                weight = next(w for w in args.latency_weights if latency_arm(w) == arm)
                run_arm(row, partial(prune_latency, dense, x, ratio, rt, batch, args, caches[False], weight))
            elif arm.startswith("ours"):
                run_arm(row, partial(prune_ours, dense, x, ratio, rt, args.p, args.budget))
            else:
                run_arm(row, partial(prune_tp, name, dense, x, ratio, rt, args.p, args.tp_steps, args.refine))

    heads = vit and args.vit_heads
    measure = measure_fn(x, measure_mode, batch, args)
    for k, ratio in enumerate(ratios):  # the first MACs target, the latency targets, then the other MACs targets
        macs_arms(ratio)
        for speedup in targets if k == 0 else []:
            row = Row(name, None, target_arm(speedup, heads), round_to, mode=picked, info={"target_speedup": speedup})
            run_arm(row, partial(prune_latency_target, dense, x, speedup, round_to, batch, args, caches[heads], measure,
                                 heads=heads))
            if slower_at_small_batches(row) and getattr(args, "small_batch_guard", False):
                retry = Row(name, None, row.arm, 2 * round_to, mode=picked, info={"target_speedup": speedup})
                run_arm(retry, partial(prune_latency_target, dense, x, speedup, 2 * round_to, batch, args,
                                       caches[heads], measure, heads=heads))
                row = choose_guarded(row, retry, speedup, args.latency_tolerance)
            if not row.error and any(arm == "tp+round" for arm, _ in arms):  # the peer at the MACs the target cost
                tp_row = Row(name, None, f"tp+round (MACs of {row.arm})", round_to, mode=picked)
                run_arm(tp_row, partial(_tp_at_macs_of, row, name, dense, x, round_to, args))
    for m in args.reference_modes:  # measured on dense only, after the arms, when time is left
        if time.perf_counter() > deadline or clock.left() < args.reserve_s:
            modes[m] = {"error": "skipped: over the time budget"}
            continue
        try:
            d = Deployed(copy.deepcopy(dense), x, MODES[m], args)
            t = d.time(batch)
            modes[m] = {**t, "setup_s": round(d.deploy_s + t["wall_s"], 2), "reference_only": True}
            console.log(f"{name} dense, {m} (reference): {t['ms']:.3f} ms, set-up {modes[m]['setup_s']} s")
        except Exception as exc:  # recorded, not fatal
            modes[m] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"}
    return report


def slower_at_small_batches(row: Row) -> bool:
    """Whether a timed row is slower than dense at one of its small batches."""
    return not row.error and any(v < 1.0 for v in row.small_batch_speedup.values())


def choose_guarded(first: Row, retry: Row, speedup: float, tolerance: float) -> Row:
    """The small-batch guard's choice between a latency-target network slower than dense at a small batch and
    its retry at twice the ``round_to``: the one that meets the target (within ``tolerance``) and is nowhere
    slower than dense; else the one meeting the target with the better worst small-batch speedup; else the
    first. The other keeps its row, its arm marked ``(not chosen)``; the chosen row says what happened."""
    def meets(r: Row) -> bool:
        return not r.error and r.speedup is not None and r.speedup >= speedup * (1 - tolerance)

    def worst(r: Row) -> float:
        return min(r.small_batch_speedup.values(), default=0.0)

    candidates = [r for r in (first, retry) if meets(r)]
    chosen = max(candidates, key=lambda r: (worst(r) >= 1.0, worst(r)), default=first)
    other = retry if chosen is first else first
    other.arm = f"{other.arm} (not chosen)"
    chosen.info["small_batch_guard"] = {
        "first_round_to": first.round_to, "retry_round_to": retry.round_to, "chosen_round_to": chosen.round_to,
        "first_small_batch_speedup": first.small_batch_speedup, "retry_small_batch_speedup": retry.small_batch_speedup,
        "retry_speedup": retry.speedup, "retry_error": retry.error}
    return chosen


def _tp_at_macs_of(ours: Row, name: str, dense: nn.Module, x: torch.Tensor, round_to: int,
                   args: argparse.Namespace) -> tuple[nn.Module, dict[str, Any]]:
    """Torch-Pruning+round at the MACs reduction a latency-target arm of ours reached (the issue's "ahead of
    Torch-Pruning+round at the same MACs")."""
    model, info = prune_tp(name, dense, x, ours.reduction, round_to, args.p, args.tp_steps, args.refine)
    return model, {**info, "macs_of": ours.arm, "macs_target": round(ours.reduction, 4)}


def _label(row: Row) -> str:
    return f"{row.target:g}× {row.arm}" if row.target is not None else row.arm
