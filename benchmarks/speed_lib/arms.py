"""Our pruning arms: GMP at an exact MACs target (uniform, rounded, latency budget) and at a measured latency target.

* ``ours``/``ours+round``: ``filter_norm`` importance, ``GMPConfig(unit="macs")`` (the policy bisects its
  budget on exact MACs), one update to the final sparsity, ``Sparsifier.prune()``; ``+round`` adds ``round_to``.
* ``ours+latency``: the same MACs target with ``budget="latency"``: a ``LatencyModel`` timed on the benchmark's
  device, batch and dtype chooses where removing ``round_to`` channels saves the most time per MAC.
* ``ours@<t>x`` (latency target): ``GMPConfig(budget="latency", target_speedup=t)``: the policy measures whole
  pruned copies with ``measure`` (the benchmark's deployment) and iterates until the measured speedup is met.
  With ``--depth``, a target the widths miss at the cap removes residual branches first
  (:mod:`benchmarks.speed_lib.depth_arm`). ``heads`` (ViT) swaps nn.MultiheadAttention for
  ExplicitMultiheadAttention first, so whole heads compete.
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from benchmarks.speed_lib.depth_arm import depth_then_width
from benchmarks.speed_lib.models import WeightMacs
from sparsify import FilterNormConfig, GMPConfig, Sparsifier, SparsifierConfig
from sparsify.measure.latency_model import LatencyModel
from sparsify.nn import ExplicitMultiheadAttention, explicit_multihead_attention_

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def latency_arm(weight: float) -> str:
    """The arm's name: ``ours+latency`` at the default importance weight 1, else with the weight."""
    return "ours+latency" if weight == 1.0 else f"ours+latency(w={weight:g})"


def target_arm(speedup: float, heads: bool = False) -> str:
    """The name of a latency-target arm: ``ours@2x`` (``ours+heads@2x`` with heads)."""
    return f"ours{'+heads' if heads else ''}@{speedup:g}x"


def prune_ours(dense: nn.Module, x: torch.Tensor, ratio: float, round_to: int | None, p: int, budget: str
               ) -> tuple[nn.Module, dict[str, Any]]:
    """GMP with ``unit="macs"`` (exact MACs, the policy bisects its budget), one update, prune."""
    fraction = WeightMacs(dense, x).layer_fraction(ratio)
    model = copy.deepcopy(dense)
    policy = GMPConfig(sparsity=fraction, unit="macs", budget=budget, start_step=0, end_step=1, update_every=1)
    sp = Sparsifier(model, x, config=SparsifierConfig(adapter=FilterNormConfig(p=p), policy=policy, round_to=round_to))
    sp.step()  # end_step=1: the final sparsity, once
    sp.prune()
    return model, {"gmp_sparsity": round(fraction, 5)}


def _latency_model_factory(args: argparse.Namespace, batch: int, round_to: int, cache: dict,
                           measure: Callable[[nn.Module], float] | None, timing: dict[str, float]
                           ) -> Callable[[Any], LatencyModel]:
    def factory(graph: Any) -> LatencyModel:
        start = time.perf_counter()
        extra = {"measure": measure} if measure is not None else {}
        lat = LatencyModel(graph, batch=batch, device=args.device, dtype=DTYPES[args.dtype], step=round_to,
                           grid_points=args.latency_points, iters=min(10, args.iters), warmup=min(3, args.warmup),
                           cache=cache, cast_params=getattr(args, "cast_params", False), **extra)
        timing["s"] = time.perf_counter() - start
        return lat

    return factory


def _layer_estimates(lat: LatencyModel, keep: dict | None) -> dict[str, float]:
    """The latency model's ms of every layer alone at the kept widths (dense widths when ``keep`` is None)."""
    out = {}
    for i, spec in enumerate(lat.layers):
        w = lat.widths(i, keep) if keep else (spec.in_channels, spec.out_channels)
        out[spec.name] = lat.layer_ms(i, *w)
    return out


def prune_latency(dense: nn.Module, x: torch.Tensor, ratio: float, round_to: int, batch: int,
                  args: argparse.Namespace, cache: dict, weight: float = 1.0,
                  heads: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    """GMP with ``budget="latency"`` at the same exact MACs target (see the module docstring).
    ``args.max_group_sparsity`` caps the fraction of any group's structures removed,
    ``--heads-max-group-sparsity`` that of the heads arm (0.5: every layer keeps at least half its heads).
    ``info["_layers_alone"]`` holds the model's per-layer estimates (dense and pruned), for the diagnostics;
    the runner pops it."""
    model = copy.deepcopy(dense)
    if heads:
        explicit_multihead_attention_(model)
    fraction = WeightMacs(model, x).layer_fraction(ratio)
    cap = heads_cap(args) if heads else getattr(args, "max_group_sparsity", 1.0)
    policy = GMPConfig(sparsity=fraction, unit="macs", budget="latency", start_step=0, end_step=1, update_every=1,
                       latency_importance_weight=weight, max_group_sparsity=cap)
    timing: dict[str, float] = {}
    sp = Sparsifier(model, x, config=SparsifierConfig(adapter=FilterNormConfig(p=args.p), policy=policy,
                                                      round_to=round_to),
                    latency_model=_latency_model_factory(args, batch, round_to, cache, None, timing))
    lat = sp.policy.context.latency_model
    disk = getattr(lat, "disk_cache_path", None)
    sp.step()
    keep = sp.policy.keep_vectors()
    estimate = lat.reduction(keep)
    alone = {"dense": _layer_estimates(lat, None), "pruned": _layer_estimates(lat, keep)}
    sp.prune()
    kept_heads = [m.num_heads for m in model.modules() if isinstance(m, ExplicitMultiheadAttention)]
    return model, {"gmp_sparsity": round(fraction, 5), "max_group_sparsity": cap,
                   "latency_configs_timed": lat.measured, **({"heads_per_layer": kept_heads} if heads else {}),
                   "latency_cache": len(cache), "latency_timing_s": round(timing.get("s", 0.0), 2),
                   "latency_model_dense_ms": round(lat.total, 3), "latency_model_pruned_ms": round(lat.after(keep), 3),
                   "estimated_layer_speedup": round(estimate, 3), "latency_disk_cache": disk, "_layers_alone": alone}


def heads_cap(args: argparse.Namespace) -> float:
    """The cap of the MACs-target heads arm: ``--heads-max-group-sparsity``, else ``--max-group-sparsity``."""
    own = getattr(args, "heads_max_group_sparsity", None)
    return own if own is not None else getattr(args, "max_group_sparsity", 1.0)


def latency_target_cap(args: argparse.Namespace) -> float:
    """The largest fraction of a group the latency-target arms may remove: ``--target-max-group-sparsity``, else
    ``--max-group-sparsity``, else 1."""
    own = getattr(args, "target_max_group_sparsity", None)
    return own if own is not None else getattr(args, "max_group_sparsity", 1.0)


def prune_latency_target(dense: nn.Module, x: torch.Tensor, speedup: float, round_to: int, batch: int,
                         args: argparse.Namespace, cache: dict, measure: Callable[[nn.Module], float],
                         heads: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    """``GMPConfig(budget="latency", target_speedup=speedup)``: the policy measures pruned copies with
    ``measure(model) -> ms`` (the benchmark's deployment, batch and dtype) and iterates; its report (estimated
    and measured ms of every probe) goes into the info. With ``heads`` the target is in ms of ``dense`` as given
    (``target_ms``), not of the explicit-attention copy the policy prunes, which is faster by itself."""
    model = copy.deepcopy(dense)
    goal: dict[str, float] = {"target_speedup": speedup}
    if heads:  # the swap alone changes the speed (H200, batch 64: 10.3 → 7.9 ms): the target is the user's dense
        goal = {"target_ms": measure(copy.deepcopy(dense)) / speedup}  # measure moves what it deploys
        explicit_multihead_attention_(model)
    cap = latency_target_cap(args)
    policy = GMPConfig(unit="macs", budget="latency", **goal, start_step=0, end_step=1,
                       update_every=1, max_group_sparsity=cap, latency_tolerance=args.latency_tolerance,
                       latency_max_iterations=args.latency_iterations)
    timing: dict[str, float] = {}
    factory = _latency_model_factory(args, batch, round_to, cache, measure, timing)
    sp = Sparsifier(model, x, config=SparsifierConfig(adapter=FilterNormConfig(p=args.p), policy=policy,
                                                      round_to=round_to), latency_model=factory)
    sp.step()
    report = getattr(sp.policy, "latency_report", None)
    info: dict[str, Any] = {"target_speedup": speedup, "max_group_sparsity": cap,
                            "latency_timing_s": round(timing.get("s", 0.0), 2)}
    if report is not None:
        info["latency_target_report"] = report.as_dict() if hasattr(report, "as_dict") else dict(vars(report))
    if report is not None and not report.met and getattr(args, "depth", False):
        policy_args = {"max_group_sparsity": cap, "latency_tolerance": args.latency_tolerance,
                       "latency_max_iterations": args.latency_iterations}
        start = copy.deepcopy(dense)
        if heads:  # the same explicit attention, so the shallower network's heads compete too
            explicit_multihead_attention_(start)
        deeper = depth_then_width(start, x, report, sp.policy.context.latency_model, round_to, args, policy_args,
                                  factory, measure)
        if deeper is not None:
            shallower, extra = deeper
            info.update(extra)
            info["latency_target_report"] = extra["depth"]["attempts"][-1]["latency_target_report"]
            info["width_only_report"] = report.as_dict()
            model = shallower
    if model is sp.model:
        sp.prune()
    if heads:
        info["heads_per_layer"] = [m.num_heads for m in model.modules() if isinstance(m, ExplicitMultiheadAttention)]
    return model, info
