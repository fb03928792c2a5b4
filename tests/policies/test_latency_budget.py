"""LatencyModel (sparsify.measure.latency_model) and the latency budget (policies/allocation/latency_budget)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from torch import nn

from sparsify import FilterNormConfig, GMPConfig, Sparsifier, SparsifierConfig
from sparsify.errors import SparsifyError
from sparsify.graph.channel_graph import build_channel_graph
from sparsify.graph.cost import module_macs
from sparsify.measure.latency_model import LatencyModel, LayerSpec
from sparsify.policies.allocation.latency_budget import allocate_by_latency
from sparsify.prune.surgery import prune_channels
from sparsify.testing import models
from sparsify.testing.oracle import _outputs, random_plan, soft_zero_

STEP = 8


class Net(nn.Module):
    """A high-resolution residual stage (16×16), then a low-resolution one (8×8) with a depthwise and a
    grouped conv: under ``expensive_hi_res`` the first stage costs 10× more per MAC."""

    def __init__(self) -> None:
        super().__init__()

        def cbr(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
                                 nn.BatchNorm2d(cout), nn.ReLU())

        self.stem, self.hi, self.down = cbr(3, 32), cbr(32, 32), cbr(32, 128, stride=2)
        self.dw, self.pw, self.grp = cbr(128, 128, groups=128), cbr(128, 96, k=1), cbr(96, 96, groups=4)
        self.fc = nn.Linear(96, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + self.hi(x)
        x = self.grp(self.pw(self.dw(self.down(x))))
        return self.fc(x.mean((2, 3)))


def make(dtype: torch.dtype = torch.float32) -> tuple[Net, torch.Tensor]:
    torch.manual_seed(0)
    model = Net().to(dtype).eval()
    with torch.no_grad():  # non-trivial BN statistics, so zeroed channels would matter if pruning were wrong
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.bias.uniform_(-0.2, 0.2)
    return model, torch.randn(2, 3, 16, 16, dtype=dtype)


def expensive_hi_res(spec: LayerSpec, in_w: int, out_w: int) -> float:
    """Synthetic ms: 10× per MAC for layers reading a 16×16 input, 1× otherwise, plus a launch cost."""
    per_mac = 10.0 if spec.op == "conv" and spec.input_shape[-1] >= 16 else 1.0
    return 0.01 + per_mac * spec.macs_at(in_w, out_w) * 1e-6


def synthetic_latency(graph: object) -> LatencyModel:
    return LatencyModel(graph, step=STEP, latency_fn=expensive_hi_res)


def sparsifier(model: nn.Module, x: torch.Tensor, fraction: float, budget: str = "latency", **kw) -> Sparsifier:
    policy = GMPConfig(sparsity=fraction, unit="macs", budget=budget, start_step=0, end_step=1, update_every=1, **kw)
    return Sparsifier(model, x, config=SparsifierConfig(adapter=FilterNormConfig(p=2), policy=policy, round_to=STEP),
                      latency_model=synthetic_latency if budget == "latency" else None)


def keep_of(sp: Sparsifier, keeps: list[np.ndarray]) -> dict[int, np.ndarray]:
    return {g.vectors[0].group.id: k for g, k in zip(sp.groups, keeps, strict=True)}


def group_of(sp: Sparsifier, tensor: str) -> int:
    return next(i for i, g in enumerate(sp.groups) if any(m.tensor == tensor and m.role == "out"
                                                           for m in g.vectors[0].group.members))


def test_removes_where_time_is_expensive_and_beats_uniform() -> None:
    model, x = make()
    sp = sparsifier(model, x, 0.4)
    lat = LatencyModel(sp.graph, step=STEP, latency_fn=expensive_hi_res)
    mags = [g.magnitude() for g in sp.groups]
    keeps = allocate_by_latency(sp.groups, mags, lat, sp.macs_model, 0.4, STEP, importance_weight=0.0)
    # the 16×16 stage's residual group is all expensive, the 128-wide group partly (down reads 16×16), the
    # conv groups of pw/grp cheap (8×8 only)
    hi, mid, low = (group_of(sp, t) for t in ("stem.0.weight", "down.0.weight", "pw.0.weight"))
    share = [float((~k).mean()) for k in keeps]
    assert share[hi] > 0 and share[mid] == 0 and share[low] == 0, share
    # the same exact MACs target with a uniform budget costs more estimated time
    for fraction in (0.4, 0.5):
        keeps = keep_of(sp, allocate_by_latency(sp.groups, mags, lat, sp.macs_model, fraction, STEP))
        uniform = keep_of(sp, _uniform(sp, fraction))
        ours_macs = 1 - sp.macs_model.after(keeps) / sp.macs_model.total
        uniform_macs = 1 - sp.macs_model.after(uniform) / sp.macs_model.total
        assert ours_macs >= fraction and uniform_macs >= fraction
        assert ours_macs <= uniform_macs + 0.02  # not bought with extra MACs
        assert lat.after(keeps) < 0.8 * lat.after(uniform), (lat.after(keeps), lat.after(uniform))
        assert lat.after(keeps) < lat.total


def _uniform(sp: Sparsifier, fraction: float) -> list[np.ndarray]:
    """GMP's uniform budget with round_to at the exact MACs target (what ``ours+round`` uses)."""
    model, x = make()
    other = sparsifier(model, x, fraction, budget="uniform")
    other.step()
    keep = other.policy.keep_vectors()
    return [keep[g.vectors[0].group.id] for g in sp.groups]


def test_importance_weight_trades_time_for_magnitude() -> None:
    model, x = make()
    sp = sparsifier(model, x, 0.4)
    lat = LatencyModel(sp.graph, step=STEP, latency_fn=expensive_hi_res)
    mags = [g.magnitude() for g in sp.groups]
    mid = group_of(sp, "down.0.weight")
    dead = np.argsort(mags[mid])[:STEP]
    mags[mid][dead] = 0.0  # a chunk of the cheaper group costs no magnitude
    pure = allocate_by_latency(sp.groups, mags, lat, sp.macs_model, 0.4, STEP, importance_weight=0.0)
    assert pure[mid].all()  # pure latency: only the expensive 16×16 stage loses channels
    weighted = allocate_by_latency(sp.groups, mags, lat, sp.macs_model, 0.4, STEP, importance_weight=1.0)
    assert not weighted[mid][dead].any() and weighted[mid].sum() == len(dead) * 15  # the free chunk goes first


def test_gmp_budget_latency_prunes_exactly_to_the_target_and_widths() -> None:
    model, x = make()
    before = copy.deepcopy(model)
    config = SparsifierConfig(adapter="filter_norm", policy=GMPConfig(unit="macs", budget="latency"))
    with pytest.raises(SparsifyError, match=r"latency_model=lambda graph"):
        Sparsifier(copy.deepcopy(model), x, config=config)  # no latency model: refused at once
    with pytest.raises(SparsifyError, match="returned dict"):
        Sparsifier(copy.deepcopy(model), x, config=config, latency_model=lambda graph: {})
    sp = sparsifier(model, x, 0.4)
    assert isinstance(sp.policy.context.latency_model, LatencyModel)  # built by the Sparsifier on its graph
    assert sp.policy.context.cost_model is sp.macs_model and sp.policy.context.round_to == STEP
    sp.step()
    keep = sp.policy.keep_vectors()
    planned = sp.macs_model.after(keep)
    result = sp.prune()
    assert result.macs_after == pytest.approx(planned, rel=1e-9)  # MacsModel is exact for the real pruned model
    assert 0.4 <= 1 - result.macs_after / result.macs_before <= 0.5
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d) and name != "stem.0":
            full = before.get_submodule(name).out_channels
            assert m.out_channels % STEP == 0 or m.out_channels == full, (name, m.out_channels)
            assert m.out_channels > 0
    assert model.grp[0].groups * 24 == model.grp[0].out_channels  # whole conv groups removed


def test_latency_plan_is_exact_oracle() -> None:
    model, x = make(torch.float64)
    reference_model = copy.deepcopy(model)
    sp = sparsifier(model, x, 0.5)
    sp.step()
    plan = {gid: np.flatnonzero(~k) for gid, k in sp.policy.keep_vectors().items() if (~k).any()}
    assert len(plan) >= 2
    cg = build_channel_graph(reference_model, x)
    soft_zero_(reference_model, cg.groups, plan)
    soft = _outputs(reference_model, x)
    prune_channels(cg, plan)
    hard = _outputs(reference_model, x)
    assert max(float((a - b).abs().max()) for a, b in zip(soft, hard, strict=True)) <= 1e-5
    soft_gmp = _outputs(model, x)
    sp.prune()
    assert torch.allclose(_outputs(model, x)[0], soft_gmp[0], atol=1e-9)


def test_interpolation_and_shared_measurements() -> None:
    model, x = make()
    cg = build_channel_graph(model, x)
    calls: list[tuple[str, int, int]] = []

    def bilinear(spec: LayerSpec, in_w: int, out_w: int) -> float:
        calls.append((spec.name, in_w, out_w))
        return 0.5 + 0.01 * in_w + 0.02 * out_w + 0.001 * in_w * out_w * (2 if spec.depthwise else 1)

    lat = LatencyModel(cg, step=STEP, grid_points=None, latency_fn=bilinear)
    assert lat.measured == len(calls) == len(set(calls)) and not lat.skipped
    names = [s.name for s in lat.layers]
    assert names == ["stem.0.weight", "hi.0.weight", "down.0.weight", "dw.0.weight", "pw.0.weight", "grp.0.weight",
                     "fc.weight"]
    hi, dw, grp = names.index("hi.0.weight"), names.index("dw.0.weight"), names.index("grp.0.weight")
    grid = (8, 16, 24, 32)
    assert {c[1:] for c in calls if c[0] == "hi.0.weight"} == {(i, o) for i in grid for o in grid}
    assert {c[1:] for c in calls if c[0] == "dw.0.weight"} == {(w, w) for w in range(8, 129, 8)}  # in = out = groups
    # grouped conv: whole groups of 24 channels, input follows output
    assert {c[1:] for c in calls if c[0] == "grp.0.weight"} == {(w, w) for w in (24, 48, 72, 96)}
    assert {c[1:] for c in calls if c[0] == "stem.0.weight"} == {(3, w) for w in grid}  # the image never shrinks
    rng = np.random.default_rng(0)
    for _ in range(20):  # bilinear interpolation reproduces a bilinear function anywhere on the grid
        i, o = (int(v) for v in rng.integers(8, 33, size=2))
        assert lat.layer_ms(hi, i, o) == pytest.approx(bilinear(lat.layers[hi], i, o))
    assert lat.layer_ms(hi, 3, 3) == pytest.approx(bilinear(lat.layers[hi], 8, 8))  # clamped below the grid
    assert lat.total == pytest.approx(sum(bilinear(s, s.in_channels, s.out_channels) for s in lat.layers))
    assert lat.after({}) == pytest.approx(lat.total)

    def square(spec: LayerSpec, in_w: int, out_w: int) -> float:
        return float(out_w) ** 2

    sq = LatencyModel(cg, step=STEP, grid_points=3, latency_fn=square)
    assert sq._tables[dw][0].tolist() == [8, 72, 128] and sq.measured < lat.measured  # 3 points: ends and middle
    assert sq.layer_ms(dw, 72, 72) == pytest.approx(72.0 ** 2)  # grid point: exact
    assert sq.layer_ms(dw, 100, 100) == pytest.approx((72.0 ** 2 * 28 + 128.0 ** 2 * 28) / 56)  # in between: linear
    assert sq.layer_ms(grp, 48, 48) == pytest.approx((24.0 ** 2 * 24 + 72.0 ** 2 * 24) / 48)

    # widths of a plan: a group of the 8×8 stage shrinks dw (in and out) and pw's input
    g = next(g for g in cg.prunable_groups() if any(m.tensor == "dw.0.weight" for m in g.members))
    keep = {g.id: np.arange(g.width) < 40}
    assert lat.widths(dw, keep) == (40, 40) and lat.widths(names.index("pw.0.weight"), keep) == (40, 96)
    assert lat.after(keep) < lat.total

    # identical layers are timed once; a shared cache times nothing again
    cache: dict = {}
    first = LatencyModel(cg, step=STEP, grid_points=3, latency_fn=bilinear, cache=cache)
    again = LatencyModel(cg, step=STEP, grid_points=3, latency_fn=bilinear, cache=cache)
    assert first.measured == len(cache) > 0 and again.measured == 0 and again.total == first.total


def test_widths_match_the_pruned_model() -> None:
    model, x = make()
    sp = sparsifier(model, x, 0.5, budget="uniform")
    lat = LatencyModel(sp.graph, step=STEP, latency_fn=expensive_hi_res)
    sp.step()
    keep = sp.policy.keep_vectors()
    widths = [lat.widths(i, keep) for i in range(len(lat.layers))]
    sp.prune()
    for spec, (in_w, out_w) in zip(lat.layers, widths, strict=True):
        m = model.get_submodule(spec.name.rpartition(".")[0])
        real = (m.in_channels, m.out_channels) if isinstance(m, nn.Conv2d) else (m.in_features, m.out_features)
        assert (in_w, out_w) == real, spec.name


def test_real_measurement_on_cpu() -> None:
    model, x = make()
    cg = build_channel_graph(model, x)
    lat = LatencyModel(cg, batch=2, device="cpu", step=16, grid_points=2, iters=1, warmup=0)
    assert lat.total > 0 and lat.measured > 0 and lat.describe()["configurations_timed"] == lat.measured
    g = next(g for g in cg.prunable_groups() if any(m.tensor == "hi.0.weight" for m in g.members))
    assert 0 < lat.after({g.id: np.arange(g.width) < 16}) and lat.batch == 2


@pytest.mark.parametrize("build", [models.functional_net, models.conv1d_net, models.grouped_conv_net, models.decoder])
def test_layers_and_widths_on_other_models(build) -> None:
    """Functional, 1-d and grouped convs are timed for real (CPU) and their widths follow any plan;
    transposed convs are listed as skipped."""
    model, x = build()
    cg = build_channel_graph(model.eval(), x)
    lat = LatencyModel(cg, device="cpu", step=2, grid_points=2, iters=1, warmup=0)
    macs = module_macs(cg.traced)
    assert lat.layers and all(s.macs == macs[s.name] for s in lat.layers) and lat.total > 0
    assert set(lat.skipped) | {s.name for s in lat.layers} == set(macs)
    assert bool(lat.skipped) == (build is models.decoder)
    plan = random_plan(cg, 0.5)
    keep = {}
    for gid, removed in plan.items():
        keep[gid] = np.ones(cg.group(gid).width, dtype=bool)
        keep[gid][removed] = False
    widths = [lat.widths(i, keep) for i in range(len(lat.layers))]
    prune_channels(cg, plan)
    for spec, (in_w, out_w) in zip(lat.layers, widths, strict=True):
        w = model.get_parameter(spec.name)
        assert (in_w, out_w) == (w.shape[1] * spec.groups_at(out_w), w.shape[0]), spec.name
    assert lat.after(keep) > 0


def test_bad_inputs() -> None:
    model, x = make()
    with pytest.raises(ValidationError, match="unit='macs'"):
        GMPConfig(budget="latency", unit="channels")
    sp = sparsifier(model, x, 0.5)
    lat = LatencyModel(sp.graph, step=STEP, latency_fn=expensive_hi_res)
    mags = [g.magnitude() for g in sp.groups]
    with pytest.raises(ValueError, match="short of"):
        allocate_by_latency(sp.groups, mags, lat, sp.macs_model, 0.99, STEP)
    with pytest.raises(ValueError, match="fraction"):
        allocate_by_latency(sp.groups, mags, lat, sp.macs_model, 1.5, STEP)
    with pytest.raises(ValueError, match="magnitudes"):
        allocate_by_latency(sp.groups, mags[:1], lat, sp.macs_model, 0.5, STEP)
    with pytest.raises(ValueError, match="step"):
        LatencyModel(sp.graph, step=0, latency_fn=expensive_hi_res)
    with pytest.raises(ValueError, match="grid_points"):
        LatencyModel(sp.graph, grid_points=1, latency_fn=expensive_hi_res)
    # a latency target stops at that fraction of the estimated latency
    keeps = keep_of(sp, allocate_by_latency(sp.groups, mags, lat, sp.macs_model, 0.3, STEP, unit="latency"))
    assert 0.3 <= 1 - lat.after(keeps) / lat.total < 0.45


@pytest.mark.parametrize("cap", [0.5, 0.6])
def test_max_group_sparsity_caps_every_group(cap: float) -> None:
    model, x = make()
    sp = sparsifier(model, x, 0.6)
    lat = LatencyModel(sp.graph, step=STEP, latency_fn=expensive_hi_res)
    mags = [g.magnitude() for g in sp.groups]
    free = allocate_by_latency(sp.groups, mags, lat, sp.macs_model, 0.6, STEP, importance_weight=0.0)
    assert max(float((~k).mean()) for k in free) == 0.75  # uncapped, the expensive 16×16 stage loses 3/4
    capped = allocate_by_latency(sp.groups, mags, lat, sp.macs_model, 0.6, STEP, importance_weight=0.0,
                                 max_group_sparsity=cap)
    assert all((~k).sum() <= cap * len(k) for k in capped), [float((~k).mean()) for k in capped]
    assert 1 - sp.macs_model.after(keep_of(sp, capped)) / sp.macs_model.total >= 0.6  # the target still met
    with pytest.raises(ValueError, match=r"max_group_sparsity=0\.25"):  # a quarter of every group is < 60% of MACs
        allocate_by_latency(sp.groups, mags, lat, sp.macs_model, 0.6, STEP, max_group_sparsity=0.25)


def test_gmp_max_group_sparsity_reaches_the_budget_and_is_checked() -> None:
    model, x = make()
    sp = sparsifier(model, x, 0.6, max_group_sparsity=0.5)
    sp.step()
    keep = sp.policy.keep_vectors()
    assert all((~k).sum() <= 0.5 * len(k) for k in keep.values()) and any((~k).any() for k in keep.values())
    removed = 1 - sp.macs_model.after(keep) / sp.macs_model.total
    assert removed >= 0.6
    result = sp.prune()
    assert 1 - result.macs_after / result.macs_before == pytest.approx(removed, rel=1e-9)
    unreachable = sparsifier(*make(), 0.6, max_group_sparsity=0.25)
    masks = [v.transform.mask.clone() for g in unreachable.policy.groups for v in g.vectors]
    with pytest.raises(ValueError, match="raise max_group_sparsity"):
        unreachable.step()
    assert all(torch.equal(m, v.transform.mask) for m, v in
               zip(masks, [v for g in unreachable.policy.groups for v in g.vectors], strict=True))  # untouched
    for kwargs in ({"max_group_sparsity": 0.0}, {"max_group_sparsity": 1.5}):
        with pytest.raises(ValidationError):
            GMPConfig(**kwargs)
    with pytest.raises(ValidationError, match="budget='latency'"):
        GMPConfig(max_group_sparsity=0.5, unit="macs", budget="uniform")
    assert GMPConfig(budget="latency", unit="macs", max_group_sparsity=0.5).max_group_sparsity == 0.5
