"""The pow rule: a positive power of a channel is element-wise and exact; a power that maps a removed
channel's zeros to something else (p <= 0, a tensor exponent) marks the base's channels inexact."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sparsify import build_channel_graph


class _Power(nn.Module):
    def __init__(self, exponent: object) -> None:
        super().__init__()
        self.a, self.b, self.exponent = nn.Linear(3, 6), nn.Linear(6, 2), exponent

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x)) + 0.5
        p = h if self.exponent == "tensor" else self.exponent
        return self.b(h ** p)


@pytest.mark.parametrize("exponent,exact", [(2, True), (0.5, True), (-1, False), (0, False), ("tensor", False)])
def test_a_power_is_exact_only_when_zeros_stay_zero(exponent: object, exact: bool) -> None:
    cg = build_channel_graph(_Power(exponent).double(), torch.randn(4, 3, dtype=torch.float64))
    group = next(g for g in cg.groups if g.name == "a")
    assert group.exact is exact, group.inexact
    if not exact:
        assert any("raises these channels to" in r for r in group.inexact), group.inexact
