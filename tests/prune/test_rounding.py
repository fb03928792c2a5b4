"""Width rounding (round_to): exactness, multiples, never above the original width, validation."""

from __future__ import annotations

import copy
from types import ModuleType

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import nn

from sparsify import GMPConfig, Sparsifier, SparsifierConfig, STRConfig, build_channel_graph, prune_channels
from sparsify.policies.gradual_magnitude import allocate_keep
from sparsify.prune.select import check_round_to, round_keep, round_plan, rounded_width
from sparsify.testing.oracle import random_plan, randomize_, soft_zero_


class Branches(nn.Module):
    """Widths that are not multiples of 8, a residual add and a concat of two branches."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 36, 3, padding=1)
        self.bn0 = nn.BatchNorm2d(36)
        self.res = nn.Conv2d(36, 36, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(36)
        self.a = nn.Conv2d(36, 20, 1)
        self.bna = nn.BatchNorm2d(20)
        self.b = nn.Conv2d(36, 44, 1)
        self.bnb = nn.BatchNorm2d(44)
        self.head = nn.Conv2d(64, 30, 1)
        self.fc = nn.Linear(30, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn0(self.stem(x)))
        y = F.relu(y + self.bn1(self.res(y)))
        y = torch.cat([F.relu(self.bna(self.a(y))), F.relu(self.bnb(self.b(y)))], 1)
        y = F.relu(self.head(y))
        return self.fc(y.mean((2, 3)))


def _widths(model: nn.Module) -> dict[str, int]:
    return {n: m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
            for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


def _check_widths(before: dict[str, int], after: dict[str, int], round_to: int) -> None:
    for name, w in after.items():
        assert w <= before[name], name
        assert w % round_to == 0 or w == before[name], (name, w, before[name])


def test_rounded_width() -> None:
    assert rounded_width(5, 64, 8) == 8
    assert rounded_width(0, 64, 8) == 0
    assert rounded_width(16, 64, 8) == 16
    assert rounded_width(61, 64, 8) == 64
    assert rounded_width(57, 60, 8) == 60  # the next multiple (64) is above the width: keep the width
    assert rounded_width(3, 6, 8) == 6  # narrower than round_to: keeps its width
    with pytest.raises(ValueError, match="between 0 and the width"):
        rounded_width(65, 64, 8)


@pytest.mark.parametrize("bad", [0, -8, 2.5, True, "8"])
def test_bad_round_to_is_refused(bad: object) -> None:
    with pytest.raises(ValueError, match="round_to must be a positive integer"):
        check_round_to(bad)
    with pytest.raises(ValidationError):
        SparsifierConfig(adapter="filter_norm", policy="gmp", round_to=bad)


def test_round_to_has_one_home_the_sparsifier_config() -> None:
    with pytest.raises(ValidationError, match=r"round_to is set on the Sparsifier.*SparsifierConfig"):
        GMPConfig(round_to=8)
    with pytest.raises(ValidationError, match="round_to is set on the Sparsifier"):
        SparsifierConfig(adapter="filter_norm", policy={"kind": "gmp", "round_to": 8})


def test_round_plan_keeps_back_the_strongest_and_rounds_every_layer() -> None:
    model = Branches().eval()
    cg = build_channel_graph(model, torch.randn(1, 3, 8, 8))
    plan = random_plan(cg, 0.6, seed=3)
    rng = np.random.default_rng(0)
    importance = {gid: rng.random(cg.group(gid).width) for gid in plan}
    rounded = round_plan(cg, plan, 8, importance)
    assert set(rounded) == set(plan)
    for gid, removed in rounded.items():
        group, original = cg.group(gid), np.asarray(plan[gid])
        assert set(removed) <= set(original)  # only keeps back, never removes more
        back = np.setdiff1d(original, removed)
        for m in group.members:
            if m.role in ("out", "scale"):
                mine = np.unique(m.structure_of)  # per layer, the kept-back ones are its strongest planned out
                b, r = np.intersect1d(back, mine), np.intersect1d(removed, mine)
                if len(b) and len(r):
                    assert importance[gid][b].min() >= importance[gid][r].max()
                kept = int(np.isin(m.structure_of, removed, invert=True).sum())
                assert kept % 8 == 0 or kept == len(m.structure_of), (m.tensor, kept)
    assert round_plan(cg, plan, None).keys() == plan.keys()
    with pytest.raises(ValueError, match="importance has 3 entries"):
        round_plan(cg, plan, 8, {gid: np.ones(3) for gid in plan})


def test_round_keep_counts_channels_of_wide_structures() -> None:
    """A grouped conv's structures are whole conv groups (here 8 channels each): round_to=8 needs nothing back."""
    model = nn.Sequential(nn.Conv2d(3, 64, 1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1, groups=8), nn.ReLU(),
                          nn.Conv2d(64, 4, 1)).eval()
    cg = build_channel_graph(model, torch.randn(1, 3, 8, 8))
    group = next(g for g in cg.prunable_groups() if g.width == 8)
    keep = np.zeros(8, dtype=bool)
    keep[:3] = True
    assert round_keep(group, keep, 8).sum() == 3  # 3 groups × 8 channels = 24 channels, a multiple of 8
    assert round_keep(group, keep, 16).sum() == 4  # 16 | 8·k needs an even number of groups


@pytest.mark.parametrize("round_to", [8, 16])
def test_rounded_plan_is_exact_on_resnet18(tv: ModuleType, round_to: int) -> None:
    """Oracle: zero structures softly, prune the rounded plan physically, compare in float64."""
    model = randomize_(tv.models.resnet18(num_classes=10)).double().eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    before = _widths(model)
    cg = build_channel_graph(model, x)
    plan = random_plan(cg, 0.6, seed=1)
    soft_zero_(model, cg.groups, plan)
    with torch.no_grad():
        reference = model(x)
    rounded = round_plan(cg, plan, round_to, {gid: np.random.default_rng(gid).random(cg.group(gid).width)
                                              for gid in plan})
    assert sum(map(len, rounded.values())) < sum(map(len, plan.values()))  # something was kept back
    prune_channels(cg, {k: v for k, v in rounded.items() if len(v)})
    with torch.no_grad():
        assert (model(x) - reference).abs().max() <= 1e-10
    after = _widths(model)
    _check_widths(before, after, round_to)
    assert after != before


def _train(model: nn.Module, sp: Sparsifier, steps: int) -> None:
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 3, 8, 8, generator=g), torch.randint(0, 5, (32,), generator=g)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-2)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        sp.step()
    model.eval()


@pytest.mark.parametrize("adapter", ["filter_norm", "bn_gamma"])
def test_gmp_round_to_masks_are_rounded_and_prune_is_exact(adapter: str) -> None:
    model = Branches()
    before = _widths(model)
    x = torch.randn(2, 3, 8, 8)
    policy = GMPConfig(sparsity=0.5, unit="channels", start_step=0, end_step=4, update_every=2)
    sp = Sparsifier(model, x, config=SparsifierConfig(adapter=adapter, policy=policy, round_to=8))
    assert sp.policy.context.round_to == 8  # the policy reads it from its context
    _train(model, sp, 4)
    for g, keep in sp.policy.keep_vectors().items():  # masks during training already have rounded widths
        group = sp.graph.group(g)
        for m in group.members:
            if m.role == "out":
                kept = int(keep[m.structure_of].sum())
                assert kept % 8 == 0 or kept == len(m.structure_of)
    with torch.no_grad():
        soft = model(x)
    sp.prune()
    with torch.no_grad():
        assert torch.allclose(model(x), soft, atol=1e-5, rtol=1e-4)
    _check_widths(before, _widths(model), 8)
    assert _widths(model) != before


def test_str_with_sparsifier_round_to_is_exact() -> None:
    """STR thresholds give any width; SparsifierConfig.round_to keeps back the zeroed channels closest to
    the threshold (their zero γ_eff and β̂ make them emit exact zeros, so the pruned model is the soft one)."""
    model = Branches()
    with torch.no_grad():
        for bn in (model.bn0, model.bn1, model.bna, model.bnb):
            bn.weight.uniform_(0.05, 1.0)
    x = torch.randn(2, 3, 8, 8)
    config = SparsifierConfig(adapter="bn_gamma", policy=STRConfig(s_init=-1.0, threshold_decay=2.0), round_to=8)
    sp = Sparsifier(model, x, config=config)
    _train(model, sp, 30)
    plain = copy.deepcopy(sp.zero_structures())
    assert any(len(z) % 8 for z in plain.values())  # STR alone gives widths that are not multiples of 8
    with torch.no_grad():
        soft = model(x)
    before = _widths(model)
    sp.prune()
    with torch.no_grad():
        assert torch.allclose(model(x), soft, atol=1e-5, rtol=1e-4)
    _check_widths(before, _widths(model), 8)


def test_allocate_keep_with_round_to_still_meets_the_channel_budget() -> None:
    model = Branches()
    sp = Sparsifier(model, torch.randn(1, 3, 8, 8), "filter_norm", GMPConfig(sparsity=0.5))
    plain = allocate_keep(sp.groups, 0.4, "channels", "uniform")
    rounded = allocate_keep(sp.groups, 0.4, "channels", "uniform", round_to=8)
    assert sum(int((~k).sum()) for k in rounded) >= sum(int((~k).sum()) for k in plain)
    for g, k in zip(sp.groups, rounded, strict=True):
        for m in g.vectors[0].group.members:
            if m.role == "out":
                kept = int(k[m.structure_of].sum())
                assert kept % 8 == 0 or kept == len(m.structure_of)
