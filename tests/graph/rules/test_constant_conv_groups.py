"""A functional conv whose group count is a constant in the model's code (timm's BlurPool2d:
``F.conv2d(x, self.filt, groups=self.channels)`` with a ``[C, 1, 3, 3]`` filter buffer) cannot follow
pruning: its channels are refused with a reason, never offered as exact.

Found by the coverage zoo on timm's tresnet_m: the filter was sliced to [64, 1, 3, 3] while the call still
said ``groups=128``, and the pruned forward failed. A group count computed from the input may be pruned."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sparsify import build_channel_graph
from sparsify.testing.oracle import check_exactness


class Blur(nn.Module):
    """A fixed depthwise blur; ``from_shape`` picks whether ``groups`` is a constant or the input's width."""

    def __init__(self, channels: int, from_shape: bool) -> None:
        super().__init__()
        self.channels = channels
        self.from_shape = from_shape
        self.register_buffer("filt", torch.ones(channels, 1, 3, 3) / 9.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        groups = x.shape[1] if self.from_shape else self.channels
        return F.conv2d(x, self.filt, padding=1, groups=groups)


def _model(from_shape: bool) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), Blur(8, from_shape), nn.Conv2d(8, 4, 1)).double()


def _blur_groups(model: nn.Module, x: torch.Tensor) -> list:
    cg = build_channel_graph(model, x)
    return [g for g in cg.groups if any(m.tensor == "filt" or m.tensor.endswith("filt") for m in g.members)
            or any(m.module == "0" and m.tensor == "weight" and m.dim == 0 for m in g.members)]


def test_a_constant_group_count_blocks_the_depthwise_channels() -> None:
    torch.manual_seed(0)
    model, x = _model(from_shape=False), torch.randn(1, 3, 10, 10, dtype=torch.float64)
    groups = _blur_groups(model, x)
    assert groups and all(not g.prunable for g in groups), [(g.name, g.prunable) for g in groups]
    assert any("groups=8 is a constant" in (g.why_not() or "") for g in groups), [g.why_not() for g in groups]
    result = check_exactness(model, x)  # whatever is still offered prunes exactly
    assert result.max_abs_diff < 1e-10


def test_a_group_count_read_from_the_input_stays_prunable() -> None:
    torch.manual_seed(0)
    model, x = _model(from_shape=True), torch.randn(1, 3, 10, 10, dtype=torch.float64)
    groups = _blur_groups(model, x)
    assert groups and any(g.prunable for g in groups), [(g.name, g.why_not()) for g in groups]
    result = check_exactness(model, x)
    assert result.max_abs_diff < 1e-10
