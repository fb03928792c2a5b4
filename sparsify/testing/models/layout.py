"""Models that reshape channels: channel shuffles (functional and module) and flattens with spatial extent."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sparsify.testing.models.common import Example, conv_bn_relu, image


# ----- ShuffleNet ---------------------------------------------------------------------------------
def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """ShuffleNet's channel shuffle written with view/transpose/contiguous/view."""
    b, c, h, w = x.size()
    x = x.view(b, groups, c // groups, h, w).transpose(1, 2).contiguous()
    return x.view(b, c, h, w)


class ShuffleUnit(nn.Module):
    """ShuffleNetV2 stride-1 unit: chunk in two, transform one half, concatenate, shuffle."""

    def __init__(self, channels: int, module_shuffle: bool = False) -> None:
        super().__init__()
        half = channels // 2
        self.branch = nn.Sequential(conv_bn_relu(half, half, k=1),
                                    nn.Conv2d(half, half, 3, 1, 1, groups=half, bias=False),
                                    nn.BatchNorm2d(half), conv_bn_relu(half, half, k=1))
        self.shuffle = nn.ChannelShuffle(2) if module_shuffle else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=1)
        out = torch.cat((x1, self.branch(x2)), dim=1)
        return self.shuffle(out) if self.shuffle is not None else channel_shuffle(out, 2)


class ShuffleNet(nn.Module):
    """Two ShuffleNetV2 units (one shuffling with view/transpose/view, one with nn.ChannelShuffle)
    between a conv-bn-relu stem and a 1×1 conv head.

    Rules: split (x.chunk), cat, layout (the shuffle chain, interior split coupling), ChannelShuffle,
    conv (depthwise), batch_norm. Topology: each unit's passthrough half is the previous shuffle's
    output, so the stem's and every branch's channels interleave.
    """

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn_relu(3, 12)
        self.unit1 = ShuffleUnit(12)
        self.unit2 = ShuffleUnit(12, module_shuffle=True)
        self.head = conv_bn_relu(12, 10, k=1)
        self.fc = nn.Linear(10, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.unit2(self.unit1(self.stem(x))))
        return self.fc(x.mean((2, 3)))


def shufflenet(dtype: torch.dtype = torch.float32) -> Example:
    return ShuffleNet().to(dtype), image(dtype)


class ModuleShuffleNet(nn.Module):
    """conv → nn.ChannelShuffle(3) → conv → torch.channel_shuffle(·, 2) → conv: shuffles whose group
    structure nothing else imposes.

    Rules: layout (a channel shuffle op as a one-op chain). Pruning must remove channels in whole
    shuffle rows (one channel from each group), or the shuffle permutes the wrong ones: ``conv1``
    has 12 / 3 = 4 structures, ``conv2`` 6 / 2 = 3.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = conv_bn_relu(3, 12)
        self.shuffle = nn.ChannelShuffle(3)
        self.conv2 = conv_bn_relu(12, 6, k=1)
        self.conv3 = nn.Conv2d(6, 5, 1)
        self.fc = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv2(self.shuffle(self.conv1(x)))
        x = self.conv3(torch.channel_shuffle(x, 2))
        return self.fc(x.mean((2, 3)))


def module_shuffle_net(dtype: torch.dtype = torch.float32) -> Example:
    return ModuleShuffleNet().to(dtype), image(dtype)


# ----- flatten with spatial extent ----------------------------------------------------------------
class FlattenNet(nn.Module):
    """conv-bn-relu on a 4×4 map, then flatten C·H·W into a linear layer (the flatten *merge*: each
    conv channel owns H·W columns of ``fc1.weight``), then a hidden linear layer.

    ``how`` picks the flatten: ``"flatten"`` (torch.flatten(x, 1)), ``"view"``
    (x.view(x.size(0), -1)) or ``"module"`` (nn.Flatten).
    Prunable groups (2): ``conv`` (through the merge) and ``fc1``.
    """

    def __init__(self, how: str = "flatten") -> None:
        super().__init__()
        self.how = how
        self.conv = conv_bn_relu(3, 6, stride=2)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(6 * 4 * 4, 10)
        self.fc2 = nn.Linear(10, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.how == "view":
            x = x.view(x.size(0), -1)
        elif self.how == "module":
            x = self.flatten(x)
        else:
            x = torch.flatten(x, 1)
        return self.fc2(F.relu(self.fc1(x)))


def flatten_net(dtype: torch.dtype = torch.float32, how: str = "flatten") -> Example:
    return FlattenNet(how).to(dtype), image(dtype)


class FlattenConcatNet(nn.Module):
    """Two conv branches, each flattened (C·H·W), concatenated into one linear layer.

    Rules: layout (two flatten merges), cat, linear. ``fc1.weight`` dim 1 would be indexed by two
    products at once, which a member cannot express yet: both branches are barriers (graph
    building must not fail); the hidden layer stays prunable.
    """

    def __init__(self) -> None:
        super().__init__()
        self.a = conv_bn_relu(3, 4, stride=2)
        self.b = conv_bn_relu(3, 5, stride=2)
        self.fc1 = nn.Linear((4 + 5) * 4 * 4, 10)
        self.fc2 = nn.Linear(10, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.a(x).flatten(1), self.b(x).flatten(1)], dim=1)
        return self.fc2(F.relu(self.fc1(x)))


def flatten_concat_net(dtype: torch.dtype = torch.float32) -> Example:
    return FlattenConcatNet().to(dtype), image(dtype)
