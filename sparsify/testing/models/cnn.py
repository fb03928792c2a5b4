"""Convolutional models: residual blocks, grouped and depthwise convolutions, 1-d/3-d and transposed
convolutions, a conv module called twice."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sparsify.testing.models.common import Example, conv_bn_relu, image


# ----- residual CNN -------------------------------------------------------------------------------
class BasicBlock(nn.Module):
    """Two conv-bn pairs and a residual add, with a strided 1×1 conv-bn shortcut when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(y)) + identity)


class ResidualCNN(nn.Module):
    """conv-bn-relu stem, an identity residual block, a downsampling block (1×1 strided shortcut),
    adaptive average pool, flatten and a linear head.

    Rules: conv, batch_norm, elementwise (ReLU, add), pool, layout (flatten), linear. Topology: the
    stem and both residual adds tie four layers' output channels into one group per stage.
    Prunable groups (4): stage 1 residual (stem, layer1.conv2, layer2 inputs), layer1 inner,
    layer2 inner, stage 2 residual (layer2.conv2, layer2.downsample, fc input).
    """

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn_relu(3, 8)
        self.layer1 = BasicBlock(8, 8)
        self.layer2 = BasicBlock(8, 12, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def residual_cnn(dtype: torch.dtype = torch.float32) -> Example:
    return ResidualCNN().to(dtype), image(dtype)


# ----- grouped convolutions and group-wise norms --------------------------------------------------
class GroupedConvNet(nn.Module):
    """A ResNeXt-like grouped conv (groups=4), a depthwise conv, a depthwise conv with channel
    multiplier 2 followed by GroupNorm(8, 32), and InstanceNorm2d(affine=True).

    Rules: conv (grouped pairs, depthwise identity, multiplier pairs), batch_norm (BatchNorm2d and
    InstanceNorm2d), group_norm (whole GroupNorm groups), reduction, linear. Structures: ``grouped`` has
    4 (its conv groups), ``pw1`` has 8 (one GroupNorm group = 2 inputs of the multiplier conv),
    ``pw2`` has 8 (its own channels).
    """

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn_relu(3, 16)
        self.grouped = conv_bn_relu(16, 16, groups=4)
        self.pw1 = conv_bn_relu(16, 16, k=1)
        self.dw = conv_bn_relu(16, 16, groups=16)
        self.dw_mult = nn.Conv2d(16, 32, 3, padding=1, groups=16)
        self.gn = nn.GroupNorm(8, 32)
        self.pw2 = nn.Conv2d(32, 8, 1)
        self.inorm = nn.InstanceNorm2d(8, affine=True)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pw1(self.grouped(self.stem(x)))
        x = F.relu(self.gn(self.dw_mult(self.dw(x))))
        x = F.relu(self.inorm(self.pw2(x)))
        return self.fc(x.mean((2, 3)))


def grouped_conv_net(dtype: torch.dtype = torch.float32) -> Example:
    return GroupedConvNet().to(dtype), image(dtype)


# ----- 1-d, 3-d and transposed convolutions -------------------------------------------------------
class Conv1dNet(nn.Module):
    """Conv1d-BatchNorm1d-ReLU twice, MaxPool1d, AdaptiveAvgPool1d, flatten, linear (input B×4×16).

    Rules: conv (1-d), batch_norm (BatchNorm1d), pool (1-d), layout, linear. Prunable groups (2).
    """

    def __init__(self) -> None:
        super().__init__()
        self.block1 = nn.Sequential(nn.Conv1d(4, 8, 3, padding=1), nn.BatchNorm1d(8), nn.ReLU(), nn.MaxPool1d(2))
        self.block2 = nn.Sequential(nn.Conv1d(8, 6, 3), nn.BatchNorm1d(6), nn.ReLU(), nn.AdaptiveAvgPool1d(1))
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.block2(self.block1(x)).flatten(1))


def conv1d_net(dtype: torch.dtype = torch.float32) -> Example:
    return Conv1dNet().to(dtype), torch.randn(2, 4, 16, dtype=dtype)


class Conv3dNet(nn.Module):
    """Conv3d-BatchNorm3d-ReLU, a second Conv3d, AdaptiveAvgPool3d, flatten, linear (input B×2×4×6×6).

    Rules: conv (3-d), batch_norm (BatchNorm3d), pool (3-d), layout, linear. Prunable groups (2).
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(2, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm3d(6)
        self.conv2 = nn.Conv3d(6, 5, 1)
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.fc = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return self.fc(self.pool(x).flatten(1))


def conv3d_net(dtype: torch.dtype = torch.float32) -> Example:
    return Conv3dNet().to(dtype), torch.randn(2, 2, 4, 6, 6, dtype=dtype)


class Decoder(nn.Module):
    """A strided conv encoder and a ConvTranspose2d decoder (groups=1) back to a 3-channel image.

    Rules: conv (ConvTranspose2d: weight dim 0 is the input channels, dim 1 the output channels),
    batch_norm, elementwise. Prunable groups (2): ``enc`` and ``up1``; ``up2``'s output is the
    model's output.
    """

    def __init__(self) -> None:
        super().__init__()
        self.enc = conv_bn_relu(3, 8, stride=2)
        self.up1 = nn.ConvTranspose2d(8, 6, 2, stride=2)
        self.bn = nn.BatchNorm2d(6)
        self.up2 = nn.ConvTranspose2d(6, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up2(F.relu(self.bn(self.up1(self.enc(x)))))


def decoder(dtype: torch.dtype = torch.float32) -> Example:
    return Decoder().to(dtype), image(dtype)


# ----- shared weights (regression) ----------------------------------------------------------------
class SharedConvNet(nn.Module):
    """One 1×1 conv module called twice in a row (weight sharing), then a 1×1 head conv.

    Rules: conv (the shared weight's members on both calls couple the input and output channels
    into one group). Pruning with zeroed weights is exact; with biases kept, the removed channels
    carry different constants into the two calls and one bias cannot absorb both, so pruning
    must refuse (InexactPruneError) rather than fold one call's constants.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.shared = nn.Conv2d(8, 8, 1)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv(x))
        return self.head(F.relu(self.shared(F.relu(self.shared(x))))).mean((2, 3))


def shared_conv_net(dtype: torch.dtype = torch.float32) -> Example:
    return SharedConvNet().to(dtype), image(dtype, size=4)
