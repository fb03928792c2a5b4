"""ATen element-wise rules found missing by the coverage zoo (issue #21): ``relu_`` (VGG under torch.export),
``gt``, ``min.other``, ``where.self`` and ``upsample_nearest2d``; the reducing overloads of ``min`` and the
one-argument ``where`` must not be taken for element-wise ones."""

from __future__ import annotations

import torch
from torch import nn

from sparsify import build_channel_graph
from sparsify.testing.contracts import TOLERANCE, rules_used
from sparsify.testing.oracle import check_exactness, randomize_
from sparsify.testing.rule_models import export_only, mask_net


def test_mask_net_under_export_prunes_through_relu_where_min_and_upsample() -> None:
    model, x = export_only(mask_net)(torch.float64)
    assert {"aten_unary", "aten_binary", "aten_pool"} <= rules_used(model, x)
    cg = build_channel_graph(model, x)
    rules = cg.facts.rule_of
    assert {rules[n] for n in ("relu_", "gt", "min_1", "where", "upsample_nearest2d")} == {
        "aten_unary", "aten_binary", "aten_pool"}, rules
    through = [g for g in cg.groups if g.prunable and any(m.module == "inner.c" and m.role == "in" for m in g.members)]
    assert through and through[0].width == 6, [(g.name, g.why_not()) for g in cg.groups]
    randomize_(model, 0)
    result = check_exactness(model, x, 0.5, 0)
    assert result.groups_pruned >= 2
    assert result.max_abs_diff <= TOLERANCE * (1 + result.output_scale)


class ReducingMin(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.fc = nn.Linear(5, 6), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.min(self.a(x).view(2, 4, 6), dim=-1).values)


def test_reducing_min_is_not_an_elementwise_rule() -> None:
    model, x = export_only(lambda dt: (ReducingMin().to(dt), torch.randn(2, 4, 5, dtype=dt)))(torch.float64)
    cg = build_channel_graph(model, x)
    assert "aten_binary" not in set(cg.facts.rule_of.values())
    offered = [g for g in cg.groups if g.prunable and any(m.module == "inner.a" and m.role == "out" for m in g.members)]
    assert offered == [], [(g.name, g.members) for g in offered]


class MinNormNet(nn.Module):
    """A norm of the given order over the channels of a conv (-inf: the smallest |x|, changed by a zero)."""

    def __init__(self, order: float) -> None:
        super().__init__()
        self.order = order
        self.a, self.b = nn.Conv2d(3, 6, 1), nn.Conv2d(6, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        return self.b(h) + torch.linalg.vector_norm(h, ord=self.order, dim=1, keepdim=True)


def _conv_a_group(order: float):
    model, x = export_only(lambda dt: (MinNormNet(order).to(dt), torch.randn(2, 3, 4, 4, dtype=dt)))(torch.float64)
    cg = build_channel_graph(model, x)
    assert cg.facts.rule_of["linalg_vector_norm"] == "aten_vector_norm"
    return next(g for g in cg.groups if any(m.module == "inner.a" and m.role == "out" for m in g.members))


def test_a_norm_of_positive_order_over_channels_keeps_them_prunable() -> None:
    group = _conv_a_group(2.0)
    assert group.prunable and group.exact, group.inexact


def test_a_norm_that_zeros_change_makes_the_channels_inexact() -> None:
    for order in (float("-inf"), 0.0, -1.0):
        group = _conv_a_group(order)
        assert not group.exact and "order" in group.inexact[0], (order, group.inexact)
