"""Budget and schedule maths: pure functions on widths, importance vectors and weight shapes.

Schedules (Zhu & Gupta cubic), per-vector keep counts (uniform, global, cost-targeted) and layer-wise
density allocations (ER, ERK as in RigL). Nothing here touches torch or module state. Which entries of a
vector to keep is decided elsewhere (top-k by importance), so the allocators return keep counts only; the
cost-targeted ones assume the removed entries are the lowest-importance ones (stable order on ties).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Hashable, Mapping, Sequence
from typing import Literal, TypeVar

import numpy as np

__all__ = [
    "Budget",
    "ShapeBudget",
    "Unit",
    "cubic_sparsity",
    "er_densities",
    "erk_densities",
    "keep_counts_for_cost",
    "keep_counts_global",
    "keep_counts_uniform",
    "smallest_meeting",
]

Unit = Literal["channels", "params", "macs"]
"""What a sparsity target counts: structures, parameters or MACs."""
Budget = Literal["uniform", "global", "erk", "latency"]
"""How a target splits across groups: one common fraction, one global importance ranking, ERK densities over
the producing weight shapes, or where removing saves the most estimated time (policies/allocation/latency_budget)."""
ShapeBudget = Literal["uniform", "erk"]
"""The budgets that read no weight values (a width plan on a meta model)."""
Normalize = Literal["none", "mean", "max"]
K = TypeVar("K", bound=Hashable)
T = TypeVar("T")

_EPS = 1e-9  # guards floor/round against products such as 0.29 * 100 = 28.999999999999996
_BISECT_STEPS = 60


# --------------------------------------------------------------------------------------------- validation


def _check_fraction(name: str, value: float) -> float:
    value = float(value)
    if not 0.0 <= value <= 1.0:  # also rejects NaN
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return value


def _check_min_keep(min_keep: int) -> int:
    if int(min_keep) != min_keep or min_keep < 0:
        raise ValueError(f"min_keep must be a non-negative integer, got {min_keep}")
    return int(min_keep)


def _as_widths(widths: Sequence[int]) -> np.ndarray:
    w = np.asarray(widths, dtype=np.int64).reshape(-1)
    if (w < 0).any():
        raise ValueError(f"widths must be non-negative, got {w.tolist()}")
    return w


def _as_vectors(vectors: Sequence[np.ndarray], name: str) -> list[np.ndarray]:
    out = [np.asarray(v, dtype=np.float64).reshape(-1) for v in vectors]
    for i, v in enumerate(out):
        if not np.isfinite(v).all():
            raise ValueError(f"{name}[{i}] contains NaN or inf")
    return out


def _round_half_up(x: np.ndarray | float) -> np.ndarray:
    return np.floor(np.asarray(x, dtype=np.float64) + 0.5 + _EPS).astype(np.int64)


def _floor(x: np.ndarray | float) -> np.ndarray:
    return np.floor(np.asarray(x, dtype=np.float64) + _EPS).astype(np.int64)


# --------------------------------------------------------------------------------------------- schedule


def cubic_sparsity(step: int, final: float, start: int, end: int, initial: float = 0.0) -> float:
    """Zhu & Gupta (2017) cubic schedule ``s_f + (s_i - s_f) * (1 - (t - t0) / (t1 - t0)) ** 3``.

    Returns ``initial`` for ``step <= start`` and ``final`` for ``step >= end`` (``final`` wins when
    ``start == end``: one-shot pruning at that step).
    """
    final, initial = _check_fraction("final", final), _check_fraction("initial", initial)
    if end < start:
        raise ValueError(f"end ({end}) must be >= start ({start})")
    if step >= end:
        return final
    if step <= start:
        return initial
    frac = (step - start) / (end - start)
    return float(final + (initial - final) * (1.0 - frac) ** 3)


# --------------------------------------------------------------------------------------------- keep counts


def keep_counts_uniform(widths: Sequence[int], sparsity: float, min_keep: int = 1) -> np.ndarray:
    """Per vector ``round(width * (1 - sparsity))`` (half up), clipped to ``[min(min_keep, width), width]``."""
    sparsity, min_keep = _check_fraction("sparsity", sparsity), _check_min_keep(min_keep)
    w = _as_widths(widths)
    keep = _round_half_up(w * (1.0 - sparsity))
    return np.minimum(np.maximum(keep, min_keep), w)


def _removable(widths: np.ndarray, min_keep: int, max_sparsity: float) -> np.ndarray:
    """Most entries each vector may lose: ``floor(width * max_sparsity)`` and leaving ``min_keep``."""
    cap = np.minimum(_floor(widths * max_sparsity), widths - np.minimum(min_keep, widths))
    return np.maximum(cap, 0)


def _normalized(v: np.ndarray, normalize: Normalize) -> np.ndarray:
    if normalize == "none" or v.size == 0:
        return v
    if normalize == "mean":
        scale = float(np.abs(v).mean())
    elif normalize == "max":
        scale = float(np.abs(v).max())
    else:
        raise ValueError(f"normalize must be 'none', 'mean' or 'max', got {normalize!r}")
    return v / scale if scale > 0 else v


def _removal_order(vectors: list[np.ndarray], normalize: Normalize, caps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(vector index, entry index) of every removable entry, lowest normalised importance first.

    Each vector contributes only its ``caps[i]`` lowest entries, so an entry the guard refuses is
    skipped and the next-lowest entry elsewhere takes its place. Ties: vector index, then position.
    """
    values, ids, ranks, positions = [], [], [], []
    for i, v in enumerate(vectors):
        order = np.argsort(v, kind="stable")[: caps[i]]
        values.append(_normalized(v, normalize)[order])
        ids.append(np.full(order.size, i, dtype=np.int64))
        ranks.append(np.arange(order.size, dtype=np.int64))
        positions.append(order.astype(np.int64))
    if not values:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    vals, vid, rank, pos = (np.concatenate(a) for a in (values, ids, ranks, positions))
    order = np.lexsort((rank, vid, vals))
    return vid[order], pos[order]


def keep_counts_global(
    importances: Sequence[np.ndarray],
    sparsity: float,
    normalize: Normalize = "mean",
    min_keep: int = 1,
    max_sparsity: float = 1.0,
) -> np.ndarray:
    """Global threshold: remove the ``round(total * sparsity)`` lowest entries pooled over all vectors.

    Importances are compared after dividing each vector by its mean or max absolute value (``normalize``).
    Each vector keeps at least ``min(min_keep, width)`` and loses at most ``floor(width * max_sparsity)``;
    removals a guard refuses go to the next-lowest entries elsewhere, so the total is met unless the
    guards allow fewer removals in all.
    """
    sparsity, min_keep = _check_fraction("sparsity", sparsity), _check_min_keep(min_keep)
    max_sparsity = _check_fraction("max_sparsity", max_sparsity)
    vectors = _as_vectors(importances, "importances")
    w = np.array([v.size for v in vectors], dtype=np.int64)
    target = int(_round_half_up(w.sum() * sparsity))
    vid, _ = _removal_order(vectors, normalize, _removable(w, min_keep, max_sparsity))
    return w - np.bincount(vid[:target], minlength=len(vectors)).astype(np.int64)


# --------------------------------------------------------------------------------------------- ER / ERK


def _allocate(
    scores: Mapping[K, float], counts: Mapping[K, int], density: float, dense: Collection[K]
) -> dict[K, float]:
    """RigL's ε solve: density_l = ε·p_l for free layers; layers that would exceed 1 become dense."""
    density = _check_fraction("density", density)
    dense_set = set(dense)
    unknown = dense_set - set(scores)
    if unknown:
        raise KeyError(f"dense names layers that are not in shapes: {sorted(map(str, unknown))}")
    budget = density * sum(counts.values())
    if sum(counts[k] for k in dense_set) > budget * (1 + 1e-12):
        raise ValueError(f"the layers in dense alone exceed the density budget {density}")
    eps = 0.0
    while True:
        free = [k for k in scores if k not in dense_set]
        if not free:
            break
        denom = sum(scores[k] * counts[k] for k in free)
        eps = (budget - sum(counts[k] for k in dense_set)) / denom
        max_p = max(scores[k] for k in free)
        if eps * max_p <= 1.0:
            break
        dense_set.update(k for k in free if scores[k] == max_p)
    return {k: 1.0 if k in dense_set else max(eps * scores[k], 0.0) for k in scores}


def _check_shape(name: object, shape: tuple[int, ...]) -> tuple[int, ...]:
    shape = tuple(int(d) for d in shape)
    if not shape or min(shape) <= 0:
        raise ValueError(f"shape of {name!r} must be non-empty with positive dims, got {shape}")
    return shape


def _shape_scores(
    shapes: Mapping[K, tuple[int, ...]], power_scale: float, ndims: int | None
) -> tuple[dict[K, float], dict[K, int]]:
    scores, counts = {}, {}
    for name, raw in shapes.items():
        shape = _check_shape(name, raw)
        dims = shape[:ndims]
        scores[name] = (sum(dims) / math.prod(dims)) ** power_scale
        counts[name] = math.prod(shape)
    return scores, counts


def erk_densities(
    shapes: Mapping[str, tuple[int, ...]], density: float, power_scale: float = 1.0, dense: Collection[str] = ()
) -> dict[str, float]:
    """RigL Erdős–Rényi-Kernel densities: ``density_l ∝ (sum(shape) / prod(shape)) ** power_scale``.

    The scale ε is solved so that ``sum(density_l * N_l) == density * N`` over all layers (``N_l`` is the
    parameter count); a layer whose density would exceed 1 is made dense and ε re-solved, repeatedly.
    Layers in ``dense`` start dense. ER and ERK coincide on linear layers.
    """
    scores, counts = _shape_scores(shapes, power_scale, None)
    return _allocate(scores, counts, density, dense)


def er_densities(
    shapes: Mapping[str, tuple[int, ...]], density: float, power_scale: float = 1.0, dense: Collection[str] = ()
) -> dict[str, float]:
    """Erdős–Rényi densities: as :func:`erk_densities` but the score uses only the first two dims (out, in)."""
    scores, counts = _shape_scores(shapes, power_scale, 2)
    return _allocate(scores, counts, density, dense)


# --------------------------------------------------------------------------------------------- cost targets


def smallest_meeting(
    keep_at: Callable[[float], T], removed_cost: Callable[[T], float], target: float,
    lo: float = 0.0, hi: float = 1.0, steps: int = _BISECT_STEPS,
) -> T:
    """``keep_at(x)`` at the smallest x in [lo, hi] whose removed cost reaches target (removal grows
    with x), by bisection; ``keep_at(hi)`` if even that falls short."""
    if removed_cost(keep_at(lo)) >= target:
        return keep_at(lo)
    if removed_cost(keep_at(hi)) < target:
        return keep_at(hi)  # the guards do not allow the target: remove what they allow
    for _ in range(steps):
        mid = 0.5 * (lo + hi)
        if removed_cost(keep_at(mid)) >= target:
            hi = mid
        else:
            lo = mid
    return keep_at(hi)


def keep_counts_for_cost(
    importances: Sequence[np.ndarray],
    costs: Sequence[np.ndarray],
    target_fraction: float,
    method: Literal["uniform", "global", "erk"],
    erk_shapes: Mapping[int, tuple[int, ...]] | None = None,
    min_keep: int = 1,
) -> np.ndarray:
    """Keep counts that remove at least ``target_fraction`` of the total cost, as little over as the method allows.

    ``costs[i][j]`` is the cost (params, MACs) saved by removing entry ``j`` of vector ``i``; each vector is
    assumed to lose its lowest-importance entries. ``uniform`` bisects one common sparsity; ``global`` removes
    entries in increasing mean-normalised importance until the removed cost reaches the target; ``erk`` bisects
    the ERK density over ``erk_shapes`` (keyed by vector index) and keeps ``round(width * density_i)``.
    Every vector keeps at least ``min(min_keep, width)``; if that makes the target unreachable, the result
    removes all that the guard allows.
    """
    target_fraction, min_keep = _check_fraction("target_fraction", target_fraction), _check_min_keep(min_keep)
    imps, cost_vecs = _as_vectors(importances, "importances"), _as_vectors(costs, "costs")
    if len(imps) != len(cost_vecs) or any(a.size != c.size for a, c in zip(imps, cost_vecs, strict=False)):
        raise ValueError("importances and costs must have the same number of vectors and the same widths")
    if any((c < 0).any() for c in cost_vecs):
        raise ValueError("costs must be non-negative")
    w = np.array([v.size for v in imps], dtype=np.int64)
    total = float(sum(c.sum() for c in cost_vecs))
    target = target_fraction * total - 1e-12 * total  # tolerate summation-order round-off

    if method == "global":
        vid, pos = _removal_order(imps, "mean", _removable(w, min_keep, 1.0))
        offsets = np.concatenate([[0], np.cumsum(w)[:-1]]).astype(np.int64)
        flat = np.concatenate(cost_vecs) if cost_vecs else np.zeros(0)
        cum = np.cumsum(flat[offsets[vid] + pos])
        n = 0 if target <= 0 else min(int(np.searchsorted(cum, target, side="left")) + 1, cum.size)
        return w - np.bincount(vid[:n], minlength=len(imps)).astype(np.int64)

    # prefix[i][k] = cost saved by removing the k lowest-importance entries of vector i
    prefix = [
        np.concatenate([[0.0], np.cumsum(c[np.argsort(v, kind="stable")])])
        for v, c in zip(imps, cost_vecs, strict=True)
    ]

    def removed_cost(keep: np.ndarray) -> float:
        return float(sum(p[n] for p, n in zip(prefix, w - keep, strict=True)))

    if method == "uniform":
        return smallest_meeting(lambda s: keep_counts_uniform(w, s, min_keep), removed_cost, target)
    if method == "erk":
        if erk_shapes is None or set(erk_shapes) != set(range(len(imps))):
            raise ValueError("method='erk' needs erk_shapes with one shape per vector index 0..n-1")
        scores, counts = _shape_scores(erk_shapes, 1.0, None)

        def keep_at(sparsity: float) -> np.ndarray:
            dens = _allocate(scores, counts, 1.0 - sparsity, ())
            keep = _round_half_up(w * np.array([dens[i] for i in range(len(imps))]))
            return np.minimum(np.maximum(keep, min_keep), w)

        return smallest_meeting(keep_at, removed_cost, target)
    raise ValueError(f"method must be 'uniform', 'global' or 'erk', got {method!r}")
