"""A norm whose affine weight is computed (timm's ScaledStdConv2d: ``F.batch_norm(w.reshape(1, out, -1),
weight=(gain * scale).view(-1))``) must block the channels it is computed from, not only its output.

Found by the coverage zoo on timm's nfnet: ``gain`` was offered as an exact group of its own, and pruning it
broke the forward (the standardised weight still had the full width)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sparsify import build_channel_graph
from sparsify.testing.oracle import check_exactness


class ScaledStdConv(nn.Module):
    """A conv whose weight is standardised per output channel with a learned gain, as in NFNets."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.out_channels = cout
        self.weight = nn.Parameter(torch.randn(cout, cin, 3, 3))
        self.gain = nn.Parameter(torch.rand(cout, 1, 1, 1) + 0.5)
        self.scale = (cin * 9) ** -0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None,
                         weight=(self.gain * self.scale).view(-1), training=True, momentum=0.0, eps=1e-6)
        return F.conv2d(x, w.reshape_as(self.weight))


def test_the_gain_of_a_standardised_weight_is_not_an_exact_group_of_its_own() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(ScaledStdConv(3, 8), nn.ReLU(), ScaledStdConv(8, 4)).double()
    x = torch.randn(1, 3, 12, 12, dtype=torch.float64)
    cg = build_channel_graph(model, x)
    gains = [g for g in cg.groups if any(m.tensor.endswith("gain") for m in g.members)]
    assert gains and all(not g.prunable for g in gains), [(g.name, g.why_not()) for g in gains]
    result = check_exactness(model, x)  # whatever is still offered prunes exactly
    assert result.max_abs_diff < 1e-10
