"""Depth where width is not enough: a latency target the channel search misses at its cap removes residual
branches first, then searches the widths of the shallower network for the same target (in ms).

:func:`sparsify.depth.depth_then_width` does the choosing (branches ranked by importance per estimated ms,
the fewest whose measured depth-only network times ``width_factor`` reaches the target, a second attempt
with more if the widths still miss); this module gives it the benchmark's width search
(``GMPConfig(budget="latency", target_ms=...)``, the same latency model and cap as the width-only search)
and turns the result into the row's ``info["depth"]``. ``width_factor`` = the width-only search's fastest
ms / dense ms.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from sparsify import FilterNormConfig, GMPConfig, Sparsifier, SparsifierConfig
from sparsify.depth import branch_ms
from sparsify.depth import depth_then_width as library_depth_then_width
from sparsify.measure.latency_model import LatencyModel

__all__ = ["depth_then_width"]


def depth_then_width(dense: nn.Module, x: torch.Tensor, width_report: Any, lat: LatencyModel, round_to: int,
                     args: argparse.Namespace, policy_args: dict[str, Any],
                     latency_model: Callable[[Any], LatencyModel], measure: Callable[[nn.Module], float]
                     ) -> tuple[nn.Module, dict[str, Any]] | None:
    """The shallower, narrower network for ``width_report.target_ms`` (:func:`sparsify.depth.depth_then_width`
    with the benchmark's width search), or None when the model has no residual branch."""

    def widths(model: nn.Module, target_ms: float) -> tuple[nn.Module, Any]:
        policy = GMPConfig(unit="macs", budget="latency", target_ms=target_ms, start_step=0, end_step=1,
                           update_every=1, **policy_args)
        sp = Sparsifier(model, x, config=SparsifierConfig(adapter=FilterNormConfig(p=args.p), policy=policy,
                                                          round_to=round_to), latency_model=latency_model)
        sp.step()
        report = sp.policy.latency_report
        sp.prune()
        return model, report

    width_factor = float(width_report.measured_ms) / float(width_report.dense_ms)
    result = library_depth_then_width(dense, x, target_ms=float(width_report.target_ms), width_factor=width_factor,
                                      measure=measure, prune_widths=widths, branch_cost=lambda b: branch_ms(lat, b))
    if result is None:
        return None
    attempts = [{"branches": a.branches, "depth_only_ms": round(a.depth_only_ms, 4), "met": a.met,
                 "latency_target_report": a.report.as_dict()} for a in result.attempts]
    info = {"depth": {"removed": [b.name for b in result.removed], "branches_found": len(result.importance),
                      "width_factor": round(width_factor, 4),
                      "depth_only_ms": {str(k): round(v, 4) for k, v in result.depth_only_ms.items()},
                      "importance": {k: round(v, 5) for k, v in result.importance.items()},
                      "attempts": attempts}}
    return result.model, info
