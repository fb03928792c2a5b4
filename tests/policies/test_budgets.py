"""Invariant tests for the pure budget and schedule maths in sparsify.policies.allocation.budgets."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sparsify.policies.allocation.budgets import (
    cubic_sparsity,
    er_densities,
    erk_densities,
    keep_counts_for_cost,
    keep_counts_global,
    keep_counts_uniform,
)

# ----------------------------------------------------------------------------------------------- fixtures


def resnet50_shapes() -> dict[str, tuple[int, ...]]:
    """The 54 conv + fc weight shapes of torchvision's ResNet-50, in module order."""
    shapes: dict[str, tuple[int, ...]] = {"conv1": (64, 3, 7, 7)}
    inplanes = 64
    for stage, (planes, blocks) in enumerate([(64, 3), (128, 4), (256, 6), (512, 3)], start=1):
        for b in range(blocks):
            p = f"layer{stage}.{b}."
            shapes[p + "conv1"] = (planes, inplanes, 1, 1)
            shapes[p + "conv2"] = (planes, planes, 3, 3)
            shapes[p + "conv3"] = (planes * 4, planes, 1, 1)
            if b == 0:
                shapes[p + "downsample.0"] = (planes * 4, inplanes, 1, 1)
            inplanes = planes * 4
    shapes["fc"] = (1000, 2048)
    return shapes


# ERK column (sparsity %, rows 1..54 in module order) of RAIVNLab/STR budgets/SparsityDistributions_90_ResNet50.csv
STR_ERK_90 = [
    58, 0, 82, 4, 4, 4, 82, 4, 4, 82, 4,
    43, 91, 52, 71, 52, 91, 52, 52, 91, 52, 52, 91, 52,
    71, 96, 76, 86, 76, 96, 76, 76, 96, 76, 76, 96, 76, 76, 96, 76, 76, 96, 76,
    86, 98, 88, 93, 88, 98, 88, 88, 98, 88,
    93,
]  # fmt: skip


def random_shapes(rng: np.random.Generator, n: int) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for i in range(n):
        out, inp = (int(x) for x in rng.integers(3, 512, size=2))
        k = int(rng.choice([1, 3, 5, 7]))
        shapes[f"l{i}"] = (out, inp) if rng.random() < 0.3 else (out, inp, k, k)
    return shapes


def random_vectors(rng: np.random.Generator, n: int, lo: int = 16, hi: int = 512) -> list[np.ndarray]:
    # per-vector scale differs by orders of magnitude so that normalisation matters
    return [rng.random(int(w)) * 10.0 ** rng.uniform(-3, 3) for w in rng.integers(lo, hi, size=n)]


# ----------------------------------------------------------------------------------------------- schedule


def test_cubic_schedule_values() -> None:
    assert cubic_sparsity(0, 0.9, start=100, end=1100) == 0.0
    assert cubic_sparsity(100, 0.9, start=100, end=1100) == 0.0
    assert cubic_sparsity(600, 0.9, start=100, end=1100) == pytest.approx(0.9 * (1 - 0.5**3))
    assert cubic_sparsity(350, 0.8, start=100, end=1100, initial=0.2) == pytest.approx(0.8 - 0.6 * 0.75**3)
    assert cubic_sparsity(1100, 0.9, start=100, end=1100) == pytest.approx(0.9)
    assert cubic_sparsity(10**6, 0.9, start=100, end=1100) == pytest.approx(0.9)
    assert cubic_sparsity(99, 0.9, start=100, end=1100, initial=0.3) == 0.3
    assert cubic_sparsity(5, 0.5, start=5, end=5) == 0.5  # one-shot at start == end


def test_cubic_schedule_monotone_and_front_loaded() -> None:
    s = np.array([cubic_sparsity(t, 0.95, start=10, end=210, initial=0.1) for t in range(0, 300)])
    assert (np.diff(s) >= -1e-15).all()
    assert s.min() == pytest.approx(0.1) and s.max() == pytest.approx(0.95)
    steps = np.diff(s[10:211])
    assert (np.diff(steps) <= 1e-12).all()  # concave: prunes fast early, slowly late


def test_cubic_schedule_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        cubic_sparsity(0, 1.5, start=0, end=10)
    with pytest.raises(ValueError):
        cubic_sparsity(0, 0.5, start=10, end=0)


# ----------------------------------------------------------------------------------------------- uniform


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.77, 0.9])
def test_uniform_meets_target(sparsity: float) -> None:
    rng = np.random.default_rng(1)
    widths = rng.integers(32, 2048, size=40)
    keep = keep_counts_uniform(widths, sparsity)
    assert keep.dtype.kind == "i" and keep.shape == widths.shape
    assert abs(1 - keep.sum() / widths.sum() - sparsity) <= 0.01
    assert (np.abs((widths - keep) / widths - sparsity) <= 0.5 / widths + 1e-12).all()  # per-vector rounding only


def test_uniform_guards() -> None:
    widths = [1, 2, 3, 10, 0]
    assert keep_counts_uniform(widths, 1.0).tolist() == [1, 1, 1, 1, 0]
    assert keep_counts_uniform(widths, 1.0, min_keep=3).tolist() == [1, 2, 3, 3, 0]
    assert keep_counts_uniform(widths, 0.0, min_keep=0).tolist() == widths
    assert keep_counts_uniform([100], 0.29).tolist() == [71]  # 0.29 * 100 is not exactly 29 in floating point


# ----------------------------------------------------------------------------------------------- global


@pytest.mark.parametrize("normalize", ["none", "mean", "max"])
@pytest.mark.parametrize("sparsity", [0.1, 0.5, 0.8])
def test_global_total_and_guards(normalize: str, sparsity: float) -> None:
    rng = np.random.default_rng(2)
    imps = random_vectors(rng, 25, lo=4, hi=300)
    widths = np.array([v.size for v in imps])
    keep = keep_counts_global(imps, sparsity, normalize=normalize, min_keep=2, max_sparsity=0.85)
    assert (widths - keep).sum() == round(widths.sum() * sparsity)
    assert (keep >= np.minimum(2, widths)).all()
    assert (widths - keep <= np.floor(widths * 0.85)).all()


def test_global_removes_the_lowest_pooled_entries() -> None:
    rng = np.random.default_rng(3)
    imps = random_vectors(rng, 12)
    keep = keep_counts_global(imps, 0.6, normalize="max", min_keep=0)
    normed = [v / v.max() for v in imps]
    pooled = np.sort(np.concatenate(normed))
    tau = pooled[round(pooled.size * 0.6) - 1]  # the largest removed value
    expected = [int((v > tau).sum()) for v in normed]
    assert keep.tolist() == expected


def test_global_redistributes_refused_removals() -> None:
    # vector 0 holds all the lowest entries; its cap pushes the rest of the removals onto the others
    imps = [np.arange(10) * 1e-3, np.arange(20) + 1.0, np.arange(10) + 100.0]
    keep = keep_counts_global(imps, 0.3, normalize="none", min_keep=1, max_sparsity=0.5)
    assert keep.tolist() == [5, 13, 10]  # 12 removed: vector 0 capped at floor(10 * 0.5) = 5, 7 more from vector 1
    keep = keep_counts_global(imps, 0.3, normalize="none", min_keep=0)
    assert keep.tolist() == [0, 18, 10]  # no guards: vector 0 collapses
    keep = keep_counts_global(imps, 0.5, normalize="none", min_keep=8)
    assert keep.tolist() == [8, 8, 8]  # target 20 exceeds the 16 removals min_keep allows: remove those


def test_global_normalization_makes_scale_irrelevant() -> None:
    rng = np.random.default_rng(4)
    imps = random_vectors(rng, 8)
    scaled = [v * 10.0 ** rng.uniform(-5, 5) for v in imps]
    for mode in ("mean", "max"):
        assert keep_counts_global(imps, 0.7, normalize=mode).tolist() == keep_counts_global(scaled, 0.7, mode).tolist()


# ----------------------------------------------------------------------------------------------- ER / ERK


@pytest.mark.parametrize("fn", [erk_densities, er_densities])
@pytest.mark.parametrize("density", [0.02, 0.1, 0.3, 0.7])
def test_erk_preserves_total_nonzeros(fn, density: float) -> None:
    rng = np.random.default_rng(5)
    for trial in range(10):
        shapes = random_shapes(rng, 15)
        dense = ["l0"] if trial % 2 else []
        sizes = {k: math.prod(s) for k, s in shapes.items()}
        total = sum(sizes.values())
        if dense and sizes["l0"] > density * total:
            continue
        dens = fn(shapes, density, dense=dense)
        assert set(dens) == set(shapes)
        assert all(0.0 <= d <= 1.0 for d in dens.values())
        assert all(dens[k] == 1.0 for k in dense)
        nonzeros = sum(round(dens[k] * sizes[k]) for k in shapes)
        assert abs(nonzeros - density * total) <= len(shapes)


def test_erk_density_ordering_follows_the_score() -> None:
    shapes = {"small": (16, 16, 3, 3), "big": (512, 512, 3, 3), "fc": (10, 512)}
    dens = erk_densities(shapes, 0.2)
    assert dens["big"] < dens["small"] <= 1.0
    assert er_densities({"a": (64, 128)}, 0.3) == erk_densities({"a": (64, 128)}, 0.3)  # ER == ERK on linear
    shapes = {"a": (64, 32, 3, 3), "b": (64, 32, 1, 1), "c": (256, 256)}
    er = er_densities(shapes, 0.2)
    assert er["a"] / er["b"] == pytest.approx(1.0)  # ER ignores the kernel dims
    assert erk_densities(shapes, 0.2)["a"] < erk_densities(shapes, 0.2)["b"]


def test_erk_power_scale_softens() -> None:
    shapes = resnet50_shapes()
    hard, soft = erk_densities(shapes, 0.1), erk_densities(shapes, 0.1, power_scale=0.5)
    assert np.std(list(soft.values())) < np.std(list(hard.values()))


def test_erk_dense_overflow_is_rejected() -> None:
    with pytest.raises(ValueError):
        erk_densities({"a": (100, 100), "b": (10, 10)}, 0.1, dense=["a"])
    with pytest.raises(KeyError):
        erk_densities({"a": (100, 100)}, 0.1, dense=["zz"])


def test_erk_resnet50_matches_str_budget_csv() -> None:
    shapes = resnet50_shapes()
    assert len(shapes) == 54
    dens = erk_densities(shapes, 0.1)
    sizes = {k: math.prod(s) for k, s in shapes.items()}
    total = sum(sizes.values())
    zeros = sum(math.floor(sizes[k] * (1 - dens[k])) for k in shapes)
    assert abs(zeros - 0.9 * total) <= len(shapes)
    sparsity = {k: 100 * (1 - d) for k, d in dens.items()}
    for (name, got), want in zip(sparsity.items(), STR_ERK_90, strict=True):
        assert round(got) == want, (name, got, want)  # the CSV rounds to whole percent; we reproduce all 54
    # the named groups of the published column
    assert sparsity["conv1"] == pytest.approx(58, abs=1)
    assert dens["layer1.0.conv1"] == 1.0  # forced dense by the ε iteration
    assert sparsity["fc"] == pytest.approx(93, abs=1)
    for stage, (s3, s1) in enumerate([(82, 4), (91, 52), (96, 76), (98, 88)], start=1):
        blocks = {1: 3, 2: 4, 3: 6, 4: 3}[stage]
        assert all(abs(sparsity[f"layer{stage}.{b}.conv2"] - s3) <= 1 for b in range(blocks))
        # 1×1 convs between the 4x and 1x widths: every conv3, and conv1 of blocks after the first
        ones = [f"layer{stage}.{b}.conv3" for b in range(blocks)] + [
            f"layer{stage}.{b}.conv1" for b in range(1, blocks)
        ]
        assert all(abs(sparsity[n] - s1) <= 1 for n in ones)


def test_resnet50_shapes_match_torchvision(tv) -> None:
    import torch

    with torch.device("meta"):
        model = tv.models.resnet50()
    got = {n.removesuffix(".weight"): tuple(p.shape) for n, p in model.named_parameters() if p.ndim > 1}
    assert list(got.items()) == list(resnet50_shapes().items())


# ----------------------------------------------------------------------------------------------- cost targets


def _removed_cost(imps: list[np.ndarray], costs: list[np.ndarray], keep: np.ndarray) -> float:
    out = 0.0
    for v, c, k in zip(imps, costs, keep, strict=True):
        out += c[np.argsort(v, kind="stable")[: v.size - k]].sum()
    return out


@pytest.mark.parametrize("method", ["uniform", "global", "erk"])
@pytest.mark.parametrize("fraction", [0.2, 0.5, 0.75])
def test_cost_targets_are_met(method: str, fraction: float) -> None:
    rng = np.random.default_rng(6)
    n = 30
    imps = random_vectors(rng, n, lo=64, hi=512)
    # cost of removing an entry: its share of the layer's params (e.g. in * k * k), different per vector
    costs = [np.full(v.size, float(rng.integers(1, 5000))) * rng.uniform(0.9, 1.1, v.size) for v in imps]
    shapes = {i: (v.size, int(rng.integers(16, 512)), 3, 3) for i, v in enumerate(imps)}
    keep = keep_counts_for_cost(imps, costs, fraction, method, erk_shapes=shapes, min_keep=1)
    widths = np.array([v.size for v in imps])
    assert ((keep >= 1) & (keep <= widths)).all()
    total = sum(c.sum() for c in costs)
    removed = _removed_cost(imps, costs, keep)
    assert removed >= fraction * total * (1 - 1e-9)
    assert removed <= fraction * total + 0.01 * total


def test_cost_target_method_shapes_the_allocation() -> None:
    rng = np.random.default_rng(7)
    imps = random_vectors(rng, 10, lo=64, hi=256)
    costs = [np.ones(v.size) for v in imps]
    widths = np.array([v.size for v in imps])
    uni = keep_counts_for_cost(imps, costs, 0.5, "uniform")
    assert np.allclose(uni / widths, 0.5, atol=0.02)  # unit costs: uniform is a common sparsity
    assert keep_counts_for_cost(imps, costs, 0.5, "global").tolist() == keep_counts_global(imps, 0.5).tolist()
    shapes = {i: (int(w), 64) for i, w in enumerate(widths)}
    erk = keep_counts_for_cost(imps, costs, 0.5, "erk", erk_shapes=shapes)
    frac = erk / widths  # ERK density ∝ 1/64 + 1/width: the narrowest vector keeps a far larger share
    assert frac[widths.argmin()] > 1.3 * frac[widths.argmax()]
    assert np.corrcoef(widths, frac)[0, 1] < -0.9
    assert (keep_counts_for_cost(imps, costs, 1.0, "global", min_keep=3) == 3).all()
    assert (keep_counts_for_cost(imps, costs, 0.0, "erk", erk_shapes=shapes) == widths).all()
    with pytest.raises(ValueError):
        keep_counts_for_cost(imps, costs, 0.5, "erk")
