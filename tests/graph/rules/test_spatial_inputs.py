"""A constant image read by a convolution or a pooling through a layout op (issue #21, found by auditing
which rules leave an input dim undeclared): its spatial dims are positions, a barrier naming the op;
its channel dim stays an exact group with the convolution's input channels."""

from __future__ import annotations

import pytest
import torch

from sparsify import build_channel_graph
from sparsify.testing.contracts import TOLERANCE
from sparsify.testing.oracle import check_exactness, randomize_
from sparsify.testing.rule_models import ExportOnly
from sparsify.testing.spatial_models import buffer_image_conv


@pytest.mark.parametrize("export", [False, True], ids=["fx", "export"])
@pytest.mark.parametrize("pool", [False, True], ids=["conv", "pool_then_conv"])
def test_a_buffer_image_s_spatial_dims_are_barriers_and_its_channels_prune_exactly(pool: bool,
                                                                                  export: bool) -> None:
    model, x = buffer_image_conv(torch.float64, pool)
    model = ExportOnly(model) if export else model
    cg = build_channel_graph(model, x)
    image = [g for g in cg.groups if any(m.tensor.endswith("img") or "_tensor_constant" in m.tensor
                                         for m in g.members)]
    spatial = [g for g in image if not any(m.role == "in" for m in g.members)]
    assert spatial and not any(g.prunable for g in spatial), [(g.name, g.why_not()) for g in spatial]
    assert all("spatial" in g.why_not() or "does not declare" in g.why_not() for g in spatial)
    randomize_(model, 0)
    result = check_exactness(model, x, 0.5, 0)
    assert result.groups_pruned >= 1
    assert result.max_abs_diff <= TOLERANCE * (1 + result.output_scale)
