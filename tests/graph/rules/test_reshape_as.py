"""``x.reshape_as(y)`` (HF BiT's weight standardisation, found by the coverage zoo, issue #21): to y's own
shape it couples x, y and the output dim by dim, under fx and torch.export; to another shape it is a barrier."""

from __future__ import annotations

import torch
from torch import nn

from sparsify import build_channel_graph
from sparsify.testing.contracts import TOLERANCE
from sparsify.testing.oracle import check_exactness, randomize_
from sparsify.testing.rule_models import export_only, reshape_as_net


def _through_reshape_as(cg) -> list:
    return [g for g in cg.groups if g.prunable and g.exact
            and {("a", "out"), ("b", "in"), ("b", "out"), ("c", "in")} <= {(m.module.rpartition(".")[2], m.role)
                                                                          for m in g.members}]


def test_reshape_as_to_the_same_shape_is_exact_under_fx_and_export() -> None:
    for builder in (reshape_as_net, export_only(reshape_as_net)):
        model, x = builder(torch.float64)
        cg = build_channel_graph(model, x)
        assert "reshape_as" in cg.facts.rule_of.values(), cg.facts.rule_of
        assert len(_through_reshape_as(cg)) == 1, [(g.name, g.why_not()) for g in cg.groups]
        randomize_(model, 0)
        result = check_exactness(model, x, 0.5, 0)
        assert result.groups_pruned >= 1
        assert result.max_abs_diff <= TOLERANCE * (1 + result.output_scale)


class ReshapeToOther(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(5, 6), nn.Linear(3, 2)
        self.template = nn.Parameter(torch.zeros(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x).reshape_as(self.template))


def test_reshape_as_to_another_shape_blocks_its_channels() -> None:
    cg = build_channel_graph(ReshapeToOther(), torch.randn(1, 5))
    group = next(g for g in cg.groups if any(m.module == "a" and m.role == "out" for m in g.members))
    assert not group.prunable and "another shape" in group.why_not(), group.why_not()
