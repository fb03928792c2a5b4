"""Models built from calls rather than modules: parameters used through ``torch.nn.functional`` and ops
without an op rule (barriers)."""

from __future__ import annotations

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from sparsify.testing.models.common import Example, conv_bn_relu, image


# ----- functional model ---------------------------------------------------------------------------
class FunctionalNet(nn.Module):
    """Parameters used through torch.nn.functional: F.conv2d / F.linear with nn.Parameter weights,
    F.batch_norm with registered buffers, a learnable layer scale of shape (C, 1, 1) multiplied in,
    a learnable positional embedding of shape (C, H, W) added, x.mean((2, 3)) and torch.cat.

    Rules: conv_functional, batch_norm_functional, linear_functional, get_attr parameters (role
    ``value``), elementwise, reduction, cat. Prunable groups (2): the first conv's channels (with
    bn, layer scale, positional embedding and their slice of ``fc_weight``) and the second conv's,
    one group of 8 + 6 structures because both reach ``fc_weight`` through the concatenation. The
    spatial dims of ``conv1_weight`` (3×3 kernel) are not channels: F.conv2d does not declare them.
    """

    def __init__(self, size: int = 8) -> None:
        super().__init__()
        self.conv1_weight = nn.Parameter(torch.randn(8, 3, 3, 3) * 0.3)
        self.conv1_bias = nn.Parameter(torch.randn(8) * 0.1)
        self.bn_weight = nn.Parameter(torch.ones(8))
        self.bn_bias = nn.Parameter(torch.zeros(8))
        self.register_buffer("bn_mean", torch.zeros(8))
        self.register_buffer("bn_var", torch.ones(8))
        self.layer_scale = nn.Parameter(torch.full((8, 1, 1), 0.5))
        self.pos_embed = nn.Parameter(torch.randn(8, size, size) * 0.1)
        self.conv2_weight = nn.Parameter(torch.randn(6, 8, 1, 1) * 0.3)
        self.fc_weight = nn.Parameter(torch.randn(4, 8 + 6) * 0.3)
        self.fc_bias = nn.Parameter(torch.zeros(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.conv2d(x, self.conv1_weight, self.conv1_bias, padding=1)
        y = F.batch_norm(y, self.bn_mean, self.bn_var, self.bn_weight, self.bn_bias, False)
        y = F.relu(y) * self.layer_scale + self.pos_embed
        z = F.relu(F.conv2d(y, self.conv2_weight))
        features = torch.cat([y.mean((2, 3)), z.mean((2, 3))], dim=1)
        return F.linear(features, self.fc_weight, self.fc_bias)


def functional_net(dtype: torch.dtype = torch.float32) -> Example:
    return FunctionalNet().to(dtype), image(dtype)


# ----- an op without a rule -----------------------------------------------------------------------
def scaled_square(x: torch.Tensor) -> torch.Tensor:
    """A custom op recorded as one fx node (``torch.fx.wrap``) that no op rule covers."""
    return x * x * 0.5


torch.fx.wrap("scaled_square")


class UnknownOpNet(nn.Module):
    """conv-bn-relu, then a conv whose output goes through ops without a rule: ``torch.fft.rfft``
    (over W) on one path and the fx-wrapped ``scaled_square`` on another.

    Rules: none for rfft and scaled_square, so the channels they touch are barriers. ``conv1`` and
    ``fc1`` stay prunable (their channels never reach the unknown ops); ``conv2`` and ``conv3``
    are barriers whose why_not() names the op and register_op_rule.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = conv_bn_relu(3, 8)
        self.conv2 = nn.Conv2d(8, 6, 1)
        self.conv3 = nn.Conv2d(8, 5, 1)
        self.fc1 = nn.Linear(11, 7)
        self.fc2 = nn.Linear(7, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        spectrum = torch.fft.rfft(self.conv2(x), dim=-1).abs().mean((2, 3))
        custom = scaled_square(self.conv3(x)).mean((2, 3))
        return self.fc2(F.relu(self.fc1(torch.cat([spectrum, custom], 1))))


def unknown_op_net(dtype: torch.dtype = torch.float32) -> Example:
    return UnknownOpNet().to(dtype), image(dtype)
