"""Residual branches to remove for a latency target: least importance per millisecond first, as few as needed.

Channel pruning has a floor (layers at their narrowest width, kernels it does not shrink); removing branches
goes below it. ``rank_for_latency`` orders branches by importance per estimated ms saved
(:func:`branch_ms`: the latency model's times of the convs and linears only the branch calls);
``fewest_for_latency`` bisects the count k of the ranked branches whose removal, *measured* on a copy, times
``factor`` (what width pruning will still save, e.g. measured floor / dense) reaches the target. Each count is
measured once; the model is not touched.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from torch import nn

from sparsify.depth.branches import ResidualBranch
from sparsify.depth.removal import remove_residual_branches
from sparsify.errors import SparsifyError
from sparsify.measure.latency_model import LatencyModel

__all__ = ["branch_ms", "fewest_for_latency", "rank_for_latency", "shallower_copy"]


def branch_ms(lat: LatencyModel, branch: ResidualBranch) -> float:
    """Estimated ms of the layers only ``branch`` calls, at their dense widths."""
    prefixes = [f"{branch.module}.{layer}" for layer in branch.layers]
    return sum(lat.layer_ms(i, spec.in_channels, spec.out_channels) for i, spec in enumerate(lat.layers)
               if any(spec.name == p or spec.name.startswith(p + ".") for p in prefixes))


def rank_for_latency(branches: Sequence[ResidualBranch], importance: torch.Tensor,
                     saved_ms: Sequence[float]) -> list[ResidualBranch]:
    """``branches`` by importance per ms saved, lowest first; branches that save no estimated time go last."""
    if not len(branches) == len(importance) == len(saved_ms):
        raise SparsifyError(f"need one importance and one ms per branch, got {len(branches)} branches, "
                            f"{len(importance)} importances and {len(saved_ms)} ms")
    order = sorted(range(len(branches)),
                   key=lambda i: (saved_ms[i] <= 0, float(importance[i]) / max(float(saved_ms[i]), 1e-12)))
    return [branches[i] for i in order]


def shallower_copy(model: nn.Module, branches: Sequence[ResidualBranch]) -> nn.Module:
    """A deep copy of ``model`` without ``branches``."""
    twin = copy.deepcopy(model)
    remove_residual_branches(twin, list(branches))
    return twin


def fewest_for_latency(model: nn.Module, ranked: Sequence[ResidualBranch], measure: Callable[[nn.Module], float],
                       target_ms: float, factor: float = 1.0) -> tuple[int, dict[int, float]]:
    """The fewest k such that ``measure(model without ranked[:k]) * factor <= target_ms`` (bisection, assuming
    more branches removed is never slower; ``len(ranked)`` when even all of them do not reach it), and the ms
    measured per count tried."""
    if not 0 < factor <= 1 or not target_ms > 0:
        raise SparsifyError(f"need 0 < factor <= 1 and target_ms > 0, got {factor} and {target_ms}")
    measured: dict[int, float] = {}

    def fast_enough(k: int) -> bool:
        if k not in measured:
            measured[k] = float(measure(shallower_copy(model, ranked[:k])))
        return measured[k] * factor <= target_ms

    lo, hi = 0, len(ranked)  # invariant: lo does not reach the target (or is 0), hi reaches it (or is all)
    if lo < hi and fast_enough(lo):
        return 0, measured
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fast_enough(mid):
            hi = mid
        else:
            lo = mid
    return hi, measured
