"""aten.group_norm (timm poolformerv2 under torch.export, found by the coverage zoo, issue #21): whole groups
of an nn.GroupNorm are structures; a functional call, whose group count is written in the code, is a barrier."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sparsify import build_channel_graph
from sparsify.testing.contracts import TOLERANCE
from sparsify.testing.oracle import check_exactness, randomize_
from sparsify.testing.rule_models import export_only, group_norm_net


def _group_of_a(cg):
    return next(g for g in cg.groups if any(m.module.endswith("a") and m.role == "out" for m in g.members))


def test_group_norm_module_under_export_prunes_whole_groups_exactly() -> None:
    model, x = export_only(group_norm_net)(torch.float64)
    cg = build_channel_graph(model, x)
    assert cg.facts.rule_of["group_norm"] == "aten_group_norm"
    group = _group_of_a(cg)
    assert group.prunable and group.exact and group.width == 4, (group.width, group.why_not())  # 4 groups of 2
    assert {m.tensor for m in group.members} >= {"inner.norm.weight", "inner.norm.bias"}
    randomize_(model, 0)
    result = check_exactness(model, x, 0.5, 0)
    assert result.groups_pruned >= 1
    assert result.max_abs_diff <= TOLERANCE * (1 + result.output_scale)


class FunctionalGroupNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)
        self.weight, self.bias = nn.Parameter(torch.ones(8)), nn.Parameter(torch.zeros(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(F.group_norm(self.a(x), 4, self.weight, self.bias))


def test_functional_group_norm_under_export_is_a_barrier() -> None:
    model, x = export_only(lambda dt: (FunctionalGroupNorm().to(dt), torch.randn(2, 3, 4, 4, dtype=dt)))(torch.float64)
    group = _group_of_a(build_channel_graph(model, x))
    assert not group.prunable and "nn.GroupNorm" in group.why_not(), group.why_not()
