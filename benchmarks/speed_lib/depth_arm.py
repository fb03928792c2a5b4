"""Depth where width is not enough: a latency target the channel search misses at its cap removes residual
branches first, then searches the widths of the shallower network for the same target (in ms).

1. The width-only search reports the fastest network it reached at the cap: ``width_factor`` = its ms / dense ms.
2. Residual branches (:func:`sparsify.depth.residual_branches`) are ranked by importance
   (:func:`sparsify.depth.branch_importance`, on the benchmark's input) per estimated ms they save (the latency
   model's times of the convs only they call), least important per ms first.
3. The fewest branches whose depth-only network, measured, times ``width_factor`` reaches the target (bisection
   over the count, each candidate measured once).
4. ``GMPConfig(budget="latency", target_ms=...)`` on the shallower network; once more with more branches removed
   if that misses too.
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from sparsify import FilterNormConfig, GMPConfig, Sparsifier, SparsifierConfig
from sparsify.depth import ResidualBranch, branch_importance, remove_residual_branches, residual_branches
from sparsify.measure.latency_model import LatencyModel

__all__ = ["depth_then_width"]


def branch_ms(lat: LatencyModel, branch: ResidualBranch) -> float:
    """Estimated ms of the layers only ``branch`` calls (dense widths)."""
    prefixes = [f"{branch.module}.{layer}" for layer in branch.layers]
    return sum(lat.layer_ms(i, spec.in_channels, spec.out_channels) for i, spec in enumerate(lat.layers)
               if any(spec.name == p or spec.name.startswith(p + ".") for p in prefixes))


def _shallower(dense: nn.Module, branches: list[ResidualBranch]) -> nn.Module:
    model = copy.deepcopy(dense)
    remove_residual_branches(model, branches)
    return model


def depth_then_width(dense: nn.Module, x: torch.Tensor, width_report: Any, lat: LatencyModel, round_to: int,
                     args: argparse.Namespace, policy_args: dict[str, Any],
                     latency_model: Callable[[Any], LatencyModel], measure: Callable[[nn.Module], float]
                     ) -> tuple[nn.Module, dict[str, Any]] | None:
    """The shallower, narrower network meeting ``width_report.target_ms`` (module docstring), or None when the
    model has no residual branch."""
    branches = residual_branches(dense, x)
    if not branches:
        return None
    importance = branch_importance(dense, branches, [x])
    saved = [branch_ms(lat, b) for b in branches]
    order = sorted(range(len(branches)), key=lambda i: (saved[i] <= 0, float(importance[i]) / max(saved[i], 1e-9)))
    ranked = [branches[i] for i in order]
    target = float(width_report.target_ms)
    width_factor = float(width_report.measured_ms) / float(width_report.dense_ms)
    depth_ms: dict[int, float] = {}

    def depth_only(k: int) -> float:
        if k not in depth_ms:
            depth_ms[k] = float(measure(_shallower(dense, ranked[:k])))
        return depth_ms[k]

    lo, hi = 0, len(ranked)  # depth_only(lo) · width_factor misses (the width search did), hi: assumed to reach
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if depth_only(mid) * width_factor <= target:
            hi = mid
        else:
            lo = mid
    attempts = []
    for k in (hi, min(len(ranked), hi + max(1, len(ranked) // 8))):
        if attempts and k == attempts[-1]["branches"]:
            break
        model = _shallower(dense, ranked[:k])
        policy = GMPConfig(unit="macs", budget="latency", target_ms=target, start_step=0, end_step=1,
                           update_every=1, **policy_args)
        sp = Sparsifier(model, x, config=SparsifierConfig(adapter=FilterNormConfig(p=args.p), policy=policy,
                                                          round_to=round_to), latency_model=latency_model)
        sp.step()
        report = sp.policy.latency_report
        sp.prune()
        attempts.append({"branches": k, "depth_only_ms": round(depth_only(k), 4), "met": report.met,
                         "latency_target_report": report.as_dict()})
        if report.met:
            break
    info = {"depth": {"removed": [b.name for b in ranked[:attempts[-1]["branches"]]],
                      "branches_found": len(branches), "width_factor": round(width_factor, 4),
                      "depth_only_ms": {str(k): round(v, 4) for k, v in sorted(depth_ms.items())},
                      "importance": {b.name: round(float(importance[i]), 5) for i, b in enumerate(branches)},
                      "attempts": attempts}}
    return model, info
