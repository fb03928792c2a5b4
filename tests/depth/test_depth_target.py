"""depth_then_width: the fewest branches the target needs, then the caller's width search, a second try if it
misses; the model itself untouched."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from sparsify.depth import depth_then_width
from sparsify.errors import SparsifyError
from tests.depth.test_latency_choice import _Block, _params


def _halving_widths(model: nn.Module, target_ms: float) -> tuple[nn.Module, SimpleNamespace]:
    """A width search that halves what is left (without touching it) and says whether that met the target."""
    return model, SimpleNamespace(met=_params(model) * 0.5 <= target_ms, ms=_params(model) * 0.5)


def test_removes_the_fewest_branches_the_width_search_needs() -> None:
    model = nn.Sequential(*[_Block(4) for _ in range(8)])
    x = torch.randn(1, 4, 5, 5)
    per_block, total = _params(model[0]), _params(model)
    target = (total - 5 * per_block) * 0.5  # halved widths after removing 5 blocks reach it, after 4 not
    result = depth_then_width(model, x, target_ms=target, width_factor=0.5, measure=_params,
                              prune_widths=_halving_widths)
    assert result is not None and result.met and len(result.removed) == 5
    assert [a.branches for a in result.attempts] == [5] and result.attempts[0].depth_only_ms == total - 5 * per_block
    assert _params(result.model) == total - 5 * per_block and _params(model) == total  # a copy; model untouched
    assert set(result.importance) == {f"{i}:add" for i in range(8)}


def test_a_width_search_that_misses_gets_one_more_try_with_more_branches() -> None:
    model = nn.Sequential(*[_Block(4) for _ in range(8)])
    total, per_block = _params(model), _params(model[0])
    target = (total - 5 * per_block) * 0.5
    # the factor promised 0.5 but the search only halves 80 %: 5 branches miss, 5 + 8 // 8 = 6 meet it
    def weaker(m: nn.Module, t: float) -> tuple[nn.Module, SimpleNamespace]:
        return m, SimpleNamespace(met=_params(m) * 0.6 <= t)

    result = depth_then_width(model, torch.randn(1, 4, 5, 5), target_ms=target, width_factor=0.5, measure=_params,
                              prune_widths=weaker)
    assert [(a.branches, a.met) for a in result.attempts] == [(5, False), (6, True)] and result.met
    assert len(result.removed) == 6 and sorted(result.depth_only_ms)[-1] == 6


def test_no_branches_gives_none_and_a_bad_factor_is_refused() -> None:
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    x = torch.randn(1, 3, 6, 6)
    assert depth_then_width(plain, x, target_ms=1.0, width_factor=0.5, measure=_params,
                            prune_widths=_halving_widths) is None
    with pytest.raises(SparsifyError, match="width_factor"):
        depth_then_width(plain, x, target_ms=1.0, width_factor=0.0, measure=_params, prune_widths=_halving_widths)


def test_a_width_search_that_returns_no_report_is_refused() -> None:
    model = nn.Sequential(*[_Block(4) for _ in range(4)])
    with pytest.raises(SparsifyError, match=r"report\.met"):
        depth_then_width(model, torch.randn(1, 4, 5, 5), target_ms=1.0, width_factor=0.5, measure=_params,
                         prune_widths=lambda m, t: m)  # type: ignore[arg-type, return-value]
