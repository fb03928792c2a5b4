"""Models whose channels branch and merge: concatenation, squeeze-excite gates, splits, channels reduced
without a parameter."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sparsify.testing.models.common import Example, conv_bn_relu, image


# ----- concatenation ------------------------------------------------------------------------------
class ConcatNet(nn.Module):
    """An Inception-like block (three branches, one through max pooling, concatenated along channels)
    followed by a DenseNet-like block whose input features are concatenated twice.

    Rules: cat (channel offsets), pool (MaxPool2d), conv, batch_norm. Topology: the stem's channels
    reach ``head_bn`` at two offsets (``cat([stem, inception, dense])`` after ``cat([stem,
    inception])`` fed ``dense``), so everything concatenated is one group of 22 structures (one per
    channel: 6 stem + 4 + 5 + 3 inception + 4 dense); ``branch_b1`` is a second prunable group.
    The 1×1 ``dense`` conv and the linear head can absorb constants, so ``keep_bias`` folds them.
    """

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn_relu(3, 6)
        self.branch_a = conv_bn_relu(6, 4, k=1)
        self.branch_b1 = conv_bn_relu(6, 3, k=1)
        self.branch_b2 = conv_bn_relu(3, 5)
        self.pool = nn.MaxPool2d(3, 1, 1)
        self.branch_c = nn.Conv2d(6, 3, 1)
        self.dense = conv_bn_relu(6 + 12, 4, k=1)
        self.head_bn = nn.BatchNorm2d(6 + 12 + 4)
        self.fc = nn.Linear(6 + 12 + 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stem(x)
        inception = torch.cat([self.branch_a(s), self.branch_b2(self.branch_b1(s)),
                               self.branch_c(self.pool(s))], dim=1)
        features = torch.cat([s, inception], 1)
        features = torch.cat([s, inception, self.dense(features)], 1)
        y = F.relu(self.head_bn(features))
        return self.fc(F.adaptive_avg_pool2d(y, 1).flatten(1))


def concat_net(dtype: torch.dtype = torch.float32) -> Example:
    return ConcatNet().to(dtype), image(dtype)


# ----- squeeze-excite -----------------------------------------------------------------------------
class SqueezeExcite(nn.Module):
    """Squeeze-excite with 1×1 convs (``linear=False``, Hardsigmoid) or Linear layers (Sigmoid)."""

    def __init__(self, channels: int, squeeze: int, linear: bool = False) -> None:
        super().__init__()
        self.linear = linear
        if linear:
            self.fc1, self.fc2 = nn.Linear(channels, squeeze), nn.Linear(squeeze, channels)
            self.gate = nn.Sigmoid()
        else:
            self.fc1, self.fc2 = nn.Conv2d(channels, squeeze, 1), nn.Conv2d(squeeze, channels, 1)
            self.gate = nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.linear:
            s = self.gate(self.fc2(F.relu(self.fc1(x.mean((2, 3))))))
            return x * s.view(x.size(0), x.size(1), 1, 1)
        s = F.adaptive_avg_pool2d(x, 1)
        return x * self.gate(self.fc2(F.relu(self.fc1(s))))


class SENet(nn.Module):
    """MobileNetV3-like: Hardswish stem, depthwise conv with a conv squeeze-excite (Hardsigmoid),
    a pointwise conv with a linear squeeze-excite (Sigmoid, gate reshaped with view), linear head.

    Rules: elementwise (Hardswish, Hardsigmoid, Sigmoid, broadcasting mul), pool, reduction (mean),
    layout (view), conv, linear. Topology: the excite layer's output channels are the gated
    channels, so ``se1.fc2``/``se2.fc2`` join the groups of ``stem``/``pw``; the squeeze widths are
    groups of their own.
    """

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.Hardswish())
        self.dw = nn.Sequential(nn.Conv2d(16, 16, 3, 1, 1, groups=16, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.se1 = SqueezeExcite(16, 4)
        self.pw = nn.Sequential(nn.Conv2d(16, 12, 1, bias=False), nn.BatchNorm2d(12), nn.Hardswish())
        self.se2 = SqueezeExcite(12, 6, linear=True)
        self.fc = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.se2(self.pw(self.se1(self.dw(self.stem(x)))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def se_net(dtype: torch.dtype = torch.float32) -> Example:
    return SENet().to(dtype), image(dtype)


# ----- split by computed and hard-coded sizes (regression) ----------------------------------------
class SplitNet(nn.Module):
    """A GLU-like gate from ``x.split(c // 2, dim=1)`` (a computed part size: prunable, channel j of
    both halves one structure) and ``x.split(6, dim=1)`` (a hard-coded part size: a barrier, since
    pruning would change the number of parts).
    """

    def __init__(self) -> None:
        super().__init__()
        self.glu_in = nn.Conv2d(3, 12, 1)
        self.glu_out = nn.Conv2d(6, 4, 1)
        self.fixed_in = nn.Conv2d(3, 12, 1)
        self.fixed_out = nn.Conv2d(6, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.glu_in(x)
        a, b = y.split(y.size(1) // 2, dim=1)
        p, q = self.fixed_in(x).split(6, dim=1)
        return (self.glu_out(a * torch.sigmoid(b)) + self.fixed_out(p * q)).mean((2, 3))


def split_net(dtype: torch.dtype = torch.float32) -> Example:
    return SplitNet().to(dtype), image(dtype, size=4)


# ----- channels consumed without a parameter (regression) -----------------------------------------
class ChannelReduceNet(nn.Module):
    """Channels consumed without a parameter: a sum over the channel dim (``x.sum(1)``) and a
    product of two activations contracting their channel dim (``a @ b.transpose(1, 2)``).

    Rules: reduction (sum keeps zeroed channels exact), matmul (activation × activation). Zeroed
    channels prune exactly; channels that still emit constants (biases kept) change both
    results, and no bias can absorb that, so pruning them must refuse. Known gap: prune_channels
    only checks constants at parameter consumers (role ``in``) and prunes these silently.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv = conv_bn_relu(3, 6)
        self.a = nn.Linear(3, 8)
        self.b = nn.Linear(3, 8)
        self.fc = nn.Linear(16 + 16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spatial = self.conv(x).sum(1).flatten(1)  # (B, H·W)
        tokens = x.flatten(2).transpose(1, 2)  # (B, H·W tokens, 3 features)
        gram = F.relu(self.a(tokens)) @ F.relu(self.b(tokens)).transpose(1, 2)  # (B, H·W, H·W)
        return self.fc(torch.cat([spatial, gram.mean(2)], 1))


def channel_reduce_net(dtype: torch.dtype = torch.float32) -> Example:
    return ChannelReduceNet().to(dtype), image(dtype, size=4)
