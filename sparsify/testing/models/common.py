"""What the model builders share: the ``(model, example_input)`` pair, an image batch and conv-bn-relu."""

from __future__ import annotations

import torch
from torch import nn

Example = tuple[nn.Module, torch.Tensor]


def image(dtype: torch.dtype, channels: int = 3, size: int = 8) -> torch.Tensor:
    """A batch of two random ``channels``×``size``×``size`` images."""
    return torch.randn(2, channels, size, size, dtype=dtype)


def conv_bn_relu(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    """Conv2d (no bias, same padding) → BatchNorm2d → ReLU."""
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU())
