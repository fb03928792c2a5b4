"""Contract models for the rules the coverage zoo found missing in timm families: a GroupNorm subclass that
calls ``F.group_norm`` in its forward (timm's GroupNorm1, poolformerv2), ATen resampling (timm
mobilenetv5's bilinear upsampling under torch.export) and powers (StarReLU). Each builder returns
``(model, example_inputs)`` in the requested dtype and names the rules it is for."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sparsify.testing.rule_models import Example, export_only


class FunctionalGroupNorm(nn.GroupNorm):
    """A GroupNorm whose forward calls F.group_norm itself (fx traces through it: not a torch.nn class)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


class SubclassGroupNormNet(nn.Module):
    """conv → FunctionalGroupNorm(4 groups) → ReLU → conv → mean → Linear: whole groups are prunable.

    Rules: group_norm_functional, conv."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.norm = nn.Conv2d(3, 8, 1), FunctionalGroupNorm(4, 8)
        self.b, self.fc = nn.Conv2d(8, 4, 3, padding=1), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.b(F.relu(self.norm(self.a(x)))).mean((2, 3)))


def subclass_group_norm_net(dtype: torch.dtype = torch.float32) -> Example:
    return SubclassGroupNormNet().to(dtype), torch.randn(2, 3, 4, 4, dtype=dtype)


class UpsampleNet(nn.Module):
    """conv → BN → ReLU → bilinear, bicubic and nearest-exact 2× upsampling (summed) → conv → mean
    → Linear; the BN's shift makes pruned channels emit constants that the upsampling must keep constant.

    Rules (under torch.export): aten_upsample, aten_conv, aten_batch_norm."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.bn = nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8)
        self.b, self.fc = nn.Conv2d(8, 4, 1), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn(self.a(x)))
        up = sum(F.interpolate(h, scale_factor=2, mode=mode) for mode in ("bilinear", "bicubic", "nearest-exact"))
        return self.fc(self.b(up).mean((2, 3)))


def _upsample_net(dtype: torch.dtype = torch.float32) -> Example:
    return UpsampleNet().to(dtype), torch.randn(2, 3, 4, 4, dtype=dtype)


upsample_net = export_only(_upsample_net)
upsample_net.__name__ = "upsample_net"



class StarReLUNet(nn.Module):
    """conv → BN → StarReLU (``s * relu(x) ** 2 + b``, scalar s and b) → 1×1 conv → mean → Linear, plus a
    torch.pow by 0.5 of a softplus branch.

    Rules: pow, conv."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.bn, self.b, self.fc = nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 1), nn.Linear(4, 3)
        self.scale, self.shift = nn.Parameter(torch.tensor([0.8])), nn.Parameter(torch.tensor([-0.1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn(self.a(x))
        h = self.scale * F.relu(h) ** 2 + self.shift + torch.pow(F.softplus(h), 0.5)
        return self.fc(self.b(h).mean((2, 3)))


def star_relu_net(dtype: torch.dtype = torch.float32) -> Example:
    return StarReLUNet().to(dtype), torch.randn(2, 3, 4, 4, dtype=dtype)


class PadNet(nn.Module):
    """conv → ReLU → F.pad (constant, then reflect) → 3×3 conv → mean → Linear; under torch.export the pads
    are aten.pad / aten.constant_pad_nd.

    Rules (under torch.export): aten_pad, aten_conv."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.fc = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 3), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.pad(F.pad(F.relu(self.a(x)), (1, 1, 0, 0)), (0, 0, 1, 1), mode="reflect")
        return self.fc(self.b(h).mean((2, 3)))


def _pad_net(dtype: torch.dtype = torch.float32) -> Example:
    return PadNet().to(dtype), torch.randn(2, 3, 4, 4, dtype=dtype)


pad_net = export_only(_pad_net)
pad_net.__name__ = "pad_net"


MODELS = {"subclass_group_norm_net": subclass_group_norm_net, "upsample_net": upsample_net,
          "star_relu_net": star_relu_net, "pad_net": pad_net}
