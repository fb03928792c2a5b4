"""Known silent-wrong cases (issue #21), kept visible: each builds a group the graph calls exact whose pruning
changes the outputs. ``xfail(strict=True)``: the day a fix lands these pass, the suite fails, and the marker
must go (the test then guards the fix)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsify.testing.oracle import check_exactness, randomize_


class ChannelSumBroadcast(nn.Module):
    """``h + h.sum(1, keepdim=True)``: a removed (zero) channel of h becomes the sum, which the next conv reads."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.fc = nn.Conv2d(3, 6, 1), nn.Conv2d(6, 4, 1), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.a(x))
        return self.fc(self.b(h + h.sum(1, keepdim=True)).mean((2, 3)))


class InputWidthReshape(nn.Module):
    """Heads hard-coded, the output reshaped with C read from the *input's* shape (timm's nextvit attention)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.heads, self.hd = dim // 4, 4
        self.v, self.proj = nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        v = self.v(x).reshape(b, n, self.heads, self.hd).transpose(1, 2)
        return self.proj(v.transpose(1, 2).reshape(b, n, c))


@pytest.mark.xfail(strict=True, reason="issue #21: a broadcast add of a channel reduction is treated as exact")
def test_broadcast_channel_sum_is_not_offered_as_exact() -> None:
    model, x = ChannelSumBroadcast().double(), torch.randn(2, 3, 4, 4, dtype=torch.float64)
    randomize_(model, 0)
    result = check_exactness(model, x, 0.5, 0)
    assert result.max_abs_diff <= 1e-9 * (1 + result.output_scale)


@pytest.mark.xfail(strict=True, reason="issue #21: a size read from another tensor's shape is taken as fixed")
def test_size_read_from_the_input_shape_blocks_the_input_width() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), InputWidthReshape(16), nn.ReLU(), nn.Linear(16, 4)).double()
    x = torch.randn(1, 5, 8, dtype=torch.float64)
    result = check_exactness(model, x)
    assert result.max_abs_diff <= 1e-9 * (1 + result.output_scale)
