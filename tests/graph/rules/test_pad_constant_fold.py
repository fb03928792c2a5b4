"""A channel that emits a constant (BN shift after a pruned conv) through F.pad (fx) or aten.pad /
aten.constant_pad_nd (torch.export) into a convolution: the pad writes zeros around the constant, so
folding it into the next bias is exact only away from the border. Today the prune neither folds nor
refused and the outputs changed silently (found with timm's 'same'-padded convs, coverage zoo issue #21).

Fixed where constants are folded (``sparsify/prune/fold.py``): a channel that is one constant except where
it is exactly zero went through a zero pad, so the fold is inexact, as a conv's own padding makes it, and
prune_channels raises InexactPruneError."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsify import build_channel_graph
from sparsify.errors import InexactPruneError
from sparsify.prune.surgery import prune_channels
from sparsify.testing.rule_models import ExportOnly


class _PadThenConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.bn, self.b = nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(F.pad(torch.relu(self.bn(self.a(x))), (1, 1, 1, 1)))


@pytest.mark.parametrize("front_end", ["fx", "export"])
def test_a_constant_through_a_pad_is_refused_or_stays_exact(front_end: str) -> None:
    torch.manual_seed(0)
    net = _PadThenConv().double().eval()
    model = net if front_end == "fx" else ExportOnly(net)
    with torch.no_grad():
        net.bn.bias.uniform_(0.5, 1.0)  # relu(β) > 0: the removed channels emit a constant
        net.a.weight[:4] = 0
        net.a.bias[:4] = 0
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    reference = model(x)
    cg = build_channel_graph(model, x)
    group = next(g for g in cg.groups if g.name.endswith("a"))
    try:
        prune_channels(cg, {group.id: [0, 1, 2, 3]})
    except InexactPruneError:
        return  # refused, the model unchanged: correct
    assert torch.allclose(model(x), reference, atol=1e-9, rtol=0)
