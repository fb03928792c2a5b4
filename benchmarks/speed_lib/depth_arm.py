"""Depth where width is not enough: a latency target the channel search misses at its cap removes residual
branches first, then searches the widths of the shallower network for the same target (in ms).

1. The width-only search reports the fastest network it reached at the cap: ``width_factor`` = its ms / dense ms.
2. Residual branches (:func:`sparsify.depth.residual_branches`) are ranked by importance
   (:func:`sparsify.depth.branch_importance`, on the benchmark's input) per estimated ms they save
   (:func:`sparsify.depth.rank_for_latency`), least important per ms first.
3. The fewest branches whose depth-only network, measured, times ``width_factor`` reaches the target
   (:func:`sparsify.depth.fewest_for_latency`).
4. ``GMPConfig(budget="latency", target_ms=...)`` on the shallower network; once more with more branches removed
   if that misses too.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from sparsify import FilterNormConfig, GMPConfig, Sparsifier, SparsifierConfig
from sparsify.depth import (
    branch_importance,
    branch_ms,
    fewest_for_latency,
    rank_for_latency,
    residual_branches,
    shallower_copy,
)
from sparsify.measure.latency_model import LatencyModel

__all__ = ["depth_then_width"]


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
    ranked = rank_for_latency(branches, importance, [branch_ms(lat, b) for b in branches])
    target = float(width_report.target_ms)
    width_factor = float(width_report.measured_ms) / float(width_report.dense_ms)
    hi, depth_ms = fewest_for_latency(dense, ranked, measure, target, min(width_factor, 1.0))

    def depth_only(k: int) -> float:
        if k not in depth_ms:
            depth_ms[k] = float(measure(shallower_copy(dense, ranked[:k])))
        return depth_ms[k]

    attempts = []
    for k in (hi, min(len(ranked), hi + max(1, len(ranked) // 8))):
        if attempts and k == attempts[-1]["branches"]:
            break
        model = shallower_copy(dense, ranked[:k])
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
