"""Branches for a latency target: ranked by importance per ms, the fewest whose measured removal reaches it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sparsify.depth import fewest_for_latency, rank_for_latency, residual_branches, shallower_copy
from sparsify.errors import SparsifyError


class _Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x)


def _params(model: nn.Module) -> float:
    """A deterministic stand-in for a latency measurement: the parameters left."""
    return float(sum(p.numel() for p in model.parameters()))


def test_rank_puts_cheap_importance_per_ms_first_and_no_saving_last() -> None:
    model = nn.Sequential(*[_Block(4) for _ in range(4)])
    branches = residual_branches(model, torch.randn(1, 4, 5, 5))
    ranked = rank_for_latency(branches, torch.tensor([0.4, 0.1, 0.2, 0.0]), [1.0, 1.0, 4.0, 0.0])
    assert [b.module for b in ranked] == ["2", "1", "0", "3"]  # 0.05, 0.1, 0.4 per ms; no saving last
    with pytest.raises(SparsifyError, match="one importance and one ms per branch"):
        rank_for_latency(branches, torch.zeros(3), [1.0] * 4)


def test_fewest_branches_that_reach_the_target_are_found_by_bisection() -> None:
    model = nn.Sequential(*[_Block(4) for _ in range(8)])
    ranked = residual_branches(model, torch.randn(1, 4, 5, 5))
    per_block, total = _params(model[0]), _params(model)
    target = total - 5 * per_block  # removing 5 blocks reaches it, 4 do not
    k, measured = fewest_for_latency(model, ranked, _params, target)
    assert k == 5 and measured[5] == target and measured[4] > target
    assert len(measured) <= 5  # 0 and a bisection over 8 counts
    assert _params(model) == total  # the model itself is untouched
    k, _ = fewest_for_latency(model, ranked, _params, target, factor=0.5)  # width pruning halves what is left
    assert k == 2  # (8 - 2) / 2 = 3 blocks' worth <= 3
    k, _ = fewest_for_latency(model, ranked, _params, total)  # the model already reaches it
    assert k == 0
    k, _ = fewest_for_latency(model, ranked, _params, 1.0)  # out of reach: all of them
    assert k == 8
    assert _params(shallower_copy(model, ranked[:3])) == total - 3 * per_block
    with pytest.raises(SparsifyError, match="factor"):
        fewest_for_latency(model, ranked, _params, target, factor=1.5)
