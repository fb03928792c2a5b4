"""prune/select.py: the one road from keep vectors to a removal plan, used by Sparsifier.prune and apply_plan."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsify import FilterNormConfig, GMPConfig, Sparsifier, SparsifyError, apply_plan, build_channel_graph
from sparsify.oneshot import GroupPlan, WidthPlan
from sparsify.prune.select import removal_plan


class Concat(nn.Module):
    """Two branches (6 and 10 channels) concatenated into one BN group, then a 12-wide group."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(3, 10, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.c = nn.Conv2d(16, 12, 1)
        self.bnc = nn.BatchNorm2d(12)
        self.head = nn.Linear(12, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn(torch.cat([self.a(x), self.b(x)], 1)))
        y = F.relu(self.bnc(self.c(y)))
        return self.head(y.mean((2, 3)))


def _graph() -> tuple[nn.Module, torch.Tensor, object, object, object]:
    torch.manual_seed(0)
    model, x = Concat().eval(), torch.randn(2, 3, 8, 8)
    cg = build_channel_graph(model, x)
    cat = next(g for g in cg.prunable_groups() if g.width == 16)
    mid = next(g for g in cg.prunable_groups() if g.width == 12)
    return model, x, cg, cat, mid


def test_removal_plan_keeps_connected_rounds_and_drops_empty_groups() -> None:
    _, _, cg, cat, mid = _graph()
    magnitude = {cat.id: np.arange(16, dtype=float), mid.id: np.arange(12, dtype=float)[::-1].copy()}
    keep = {cat.id: np.arange(16) >= 6, mid.id: np.zeros(12, dtype=bool)}  # empties branch a and the whole group
    plan, kept = removal_plan(cg, keep, magnitude.__getitem__)
    assert sorted(kept) == sorted([cat.name, mid.name])
    np.testing.assert_array_equal(plan[cat.id], np.arange(5))  # branch a keeps its strongest (index 5)
    np.testing.assert_array_equal(plan[mid.id], np.arange(1, 12))  # the group keeps its strongest (index 0)
    # rounding to 2 channels per layer keeps back the strongest removed structures; nothing is removed anew
    plan, _ = removal_plan(cg, keep, magnitude.__getitem__, round_to=2)
    np.testing.assert_array_equal(plan[cat.id], np.arange(4))  # branch a (6 wide) keeps 2: indices 4, 5
    np.testing.assert_array_equal(plan[mid.id], np.arange(2, 12))  # keeps 2: indices 0, 1
    full = {cat.id: np.ones(16, dtype=bool)}
    assert removal_plan(cg, full, magnitude.__getitem__) == ({}, [])  # nothing to remove: no entry
    with pytest.raises(ValueError, match="round_to must be a positive integer"):
        removal_plan(cg, keep, magnitude.__getitem__, round_to=0)


def test_sparsifier_prune_and_apply_plan_take_the_same_road() -> None:
    """GMP masks on filter norms, pruned by the Sparsifier, remove what apply_plan removes with filter_norm
    importance at the same widths (both through removal_plan)."""
    model, x, *_ = _graph()
    other = copy.deepcopy(model)
    sp = Sparsifier(model, x, "filter_norm", GMPConfig(sparsity=0.5, end_step=1, update_every=1))
    sp.step()
    result = sp.prune()
    plan = WidthPlan(model="Concat", sparsity=0.5, unit="channels", budget="uniform",
                     groups=[GroupPlan(name=n, width=w, keep=after) for n, (w, after) in result.widths.items()
                             if after < w])
    via_plan = apply_plan(other, x, plan, importance=FilterNormConfig())
    assert via_plan.surgery.plan == result.surgery.plan and via_plan.surgery.plan


def test_apply_plan_takes_any_adapter_kind_and_round_to() -> None:
    model, x, _, cat, mid = _graph()
    with torch.no_grad():
        model.bnc.weight.copy_(torch.linspace(0.1, 1.2, 12))
    plan = WidthPlan(model="Concat", sparsity=0.5, unit="channels", budget="uniform",
                     groups=[GroupPlan(name=mid.name, width=12, keep=5)])
    by_gamma = apply_plan(copy.deepcopy(model), x, plan, importance="bn_gamma")  # any registered adapter kind
    np.testing.assert_array_equal(by_gamma.removed[mid.name], np.arange(7))  # the smallest |γ| go
    rounded = apply_plan(copy.deepcopy(model), x, plan, importance="bn_gamma", round_to=2)
    np.testing.assert_array_equal(rounded.removed[mid.name], np.arange(6))  # 5 kept → 6: the strongest comes back
    removed = {name: apply_plan(copy.deepcopy(model), x, plan, importance=name).removed[mid.name]
               for name in ("magnitude", "filter_norm")}  # "magnitude" is the documented alias of filter_norm
    np.testing.assert_array_equal(removed["magnitude"], removed["filter_norm"])
    with pytest.raises(SparsifyError, match=r"unknown importance 'nope'.*bn_gamma.*'index'"):
        apply_plan(copy.deepcopy(model), x, plan, importance="nope")
    with pytest.raises(SparsifyError, match="does not cover"):
        apply_plan(copy.deepcopy(model), x, plan, importance="rnn_units")
    # the concat group: by index score 0..6 go; branch a (0..5) keeps its strongest (5), round_to=2 a second
    # one (4), branch b (6..15, 9 kept) its full width 10 (6 comes back); the BN's 12 channels are even too
    cat_plan = WidthPlan(model="Concat", sparsity=0.5, unit="channels", budget="uniform",
                         groups=[GroupPlan(name=cat.name, width=16, keep=9)])
    by_index = apply_plan(copy.deepcopy(model), x, cat_plan, importance=lambda graph, group: np.arange(group.width),
                          round_to=2)
    np.testing.assert_array_equal(by_index.removed[cat.name], np.arange(4))
