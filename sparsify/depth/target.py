"""A latency target through depth and width: remove the residual branches a target needs, then prune widths.

Width pruning has a floor; where the width search misses a target at its cap, :func:`depth_then_width`
ranks the residual branches by importance per ms (:func:`~sparsify.depth.rank_for_latency`), removes the
fewest whose measured depth-only network, times what widths will still save (``width_factor``: the width
search's fastest ms / dense ms), reaches the target (:func:`~sparsify.depth.fewest_for_latency`), and hands
the shallower copy to ``prune_widths(model, target_ms) -> (pruned, report)`` — your width search, e.g. a
``Sparsifier`` with ``GMPConfig(budget="latency", target_ms=target_ms)`` whose ``report.met`` says whether it
got there. If it did not, it tries once more with an eighth more of the branches removed.

    def widths(shallower, target_ms):
        sp = Sparsifier(shallower, x, config=SparsifierConfig(policy=GMPConfig(
            unit="macs", budget="latency", target_ms=target_ms, start_step=0, end_step=1)), latency_model=...)
        sp.step(); report = sp.policy.latency_report; sp.prune()
        return shallower, report

    result = depth_then_width(model, x, target_ms=dense_ms / 3, width_factor=fastest_ms / dense_ms,
                              measure=my_ms, prune_widths=widths, branch_cost=partial(branch_ms, latency_model))

The model itself is not touched; every network tried is a copy.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from sparsify.depth.branches import ResidualBranch, residual_branches
from sparsify.depth.importance import branch_importance
from sparsify.depth.latency import fewest_for_latency, rank_for_latency, shallower_copy
from sparsify.errors import SparsifyError

__all__ = ["DepthAttempt", "DepthForLatency", "depth_then_width"]


@dataclass(frozen=True)
class DepthAttempt:
    """One shallower network handed to the width search: branches removed, its depth-only ms, the outcome."""

    branches: int
    depth_only_ms: float
    met: bool
    report: Any  # what prune_widths returned beside the model


@dataclass
class DepthForLatency:
    """The outcome of :func:`depth_then_width`: the last network tried (the one that met the target if any)."""

    model: nn.Module
    removed: list[ResidualBranch]
    attempts: list[DepthAttempt]
    depth_only_ms: dict[int, float]  # measured ms of the depth-only network per count of branches removed
    importance: dict[str, float] = field(default_factory=dict)  # branch name -> importance

    @property
    def met(self) -> bool:
        return bool(self.attempts) and self.attempts[-1].met


def depth_then_width(model: nn.Module, example: Any, *, target_ms: float, width_factor: float,
                     measure: Callable[[nn.Module], float],
                     prune_widths: Callable[[nn.Module, float], tuple[nn.Module, Any]],
                     branch_cost: Callable[[ResidualBranch], float] | None = None,
                     batches: Iterable[Any] | None = None) -> DepthForLatency | None:
    """Depth, then widths, for ``target_ms`` (module docstring); None when ``model`` has no residual branch.

    ``measure(model) -> ms`` times a copy as deployed; ``branch_cost(branch) -> ms`` estimates what a branch
    costs (default: the same for all, so importance alone ranks); ``batches``: inputs for the importance
    (default ``[example]``); ``prune_widths(shallower, target_ms)`` returns the pruned network and a report
    with ``.met``."""
    if not 0 < width_factor:
        raise SparsifyError(f"width_factor must be > 0 (fastest width-pruned ms / dense ms), got {width_factor}")
    branches = residual_branches(model, example)
    if not branches:
        return None
    importance = branch_importance(model, branches, list(batches) if batches is not None else [example])
    costs = [float(branch_cost(b)) if branch_cost is not None else 1.0 for b in branches]
    ranked = rank_for_latency(branches, importance, costs)
    first, depth_ms = fewest_for_latency(model, ranked, measure, target_ms, min(width_factor, 1.0))
    attempts: list[DepthAttempt] = []
    for k in dict.fromkeys((first, min(len(ranked), first + max(1, len(ranked) // 8)))):
        if k not in depth_ms:
            depth_ms[k] = float(measure(shallower_copy(model, ranked[:k])))
        returned = prune_widths(shallower_copy(model, ranked[:k]), target_ms)
        if not (isinstance(returned, tuple) and len(returned) == 2 and isinstance(returned[0], nn.Module)
                and isinstance(getattr(returned[1], "met", None), bool)):
            raise SparsifyError("prune_widths(model, target_ms) must return (pruned nn.Module, report) with a bool "
                                f"report.met (e.g. the policy's latency_report), got {type(returned).__name__}")
        pruned, report = returned
        attempts.append(DepthAttempt(k, depth_ms[k], report.met, report))
        if attempts[-1].met:
            break
    return DepthForLatency(pruned, list(ranked[:attempts[-1].branches]), attempts, dict(sorted(depth_ms.items())),
                           {b.name: float(importance[i]) for i, b in enumerate(branches)})
