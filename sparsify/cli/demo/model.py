"""The demo's CNN: a stem, one residual (or plain) block per stage, global average pool, a linear classifier."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["Block", "DemoNet", "build_model"]

_BN = nn.modules.batchnorm._BatchNorm


def _conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout)]


class Block(nn.Module):
    """Two 3×3 conv-BN pairs with ReLUs; with ``residual``, a shortcut (1×1 conv-BN when the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int = 1, residual: bool = True) -> None:
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(cin, cout, 3, stride)
        self.conv2, self.bn2 = _conv_bn(cout, cout, 3, 1)
        self.relu = nn.ReLU()
        self.residual = residual
        self.shortcut = (nn.Sequential(*_conv_bn(cin, cout, 1, stride))
                         if residual and (stride != 1 or cin != cout) else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        if self.residual:
            y = y + (x if self.shortcut is None else self.shortcut(x))
        return self.relu(y)


class DemoNet(nn.Module):
    """Stem conv-BN-ReLU, one ``Block`` per stage, global average pool, linear classifier."""

    def __init__(self, in_channels: int, num_classes: int, stem: int, stages: Sequence[tuple[int, int]],
                 residual: bool = True) -> None:
        super().__init__()
        self.stem = nn.Sequential(*_conv_bn(in_channels, stem), nn.ReLU())
        blocks, cin = [], stem
        for width, stride in stages:
            blocks.append(Block(cin, width, stride, residual))
            cin = width
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.blocks(self.stem(x))), 1))


def build_model(image_shape: Sequence[int], num_classes: int, arch: str, gamma_init: str = "ones") -> DemoNet:
    """The demo CNN for images of ``image_shape`` (C, H, W): 2 stages on 8×8 digits, 3 on 28/32-pixel images.
    ``arch`` is "residual" or "plain"; ``gamma_init`` "ones" or "uniform" (BN γ ~ U(0.1, 1))."""
    if arch not in ("residual", "plain"):
        raise ValueError(f"arch must be 'residual' or 'plain', got {arch!r}")
    in_channels, size = image_shape[0], image_shape[1]
    stages = [(32, 1), (64, 2)] if size <= 8 else [(32, 1), (64, 2), (128, 2)]
    model = DemoNet(in_channels, num_classes, 32, stages, residual=arch == "residual")
    if gamma_init == "uniform":
        for m in model.modules():
            if isinstance(m, _BN):
                nn.init.uniform_(m.weight, 0.1, 1.0)
    elif gamma_init != "ones":
        raise ValueError(f"gamma_init must be 'ones' or 'uniform', got {gamma_init!r}")
    return model
