"""Small hand-built models, each exercising a few op rules or a topology the channel graph must get right.

Every builder returns ``(model, example_input)`` in the requested dtype (token ids stay int64). The
models are tiny (a few thousand parameters, 8×8 images, batch 2) so that the exactness oracle runs on
each of them in well under a second. ``MODELS`` maps a name to each builder.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

Example = tuple[nn.Module, torch.Tensor]


def _image(dtype: torch.dtype, channels: int = 3, size: int = 8) -> torch.Tensor:
    return torch.randn(2, channels, size, size, dtype=dtype)


def _cbr(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU())


# ----- 1. residual CNN ---------------------------------------------------------------------------
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
        self.stem = _cbr(3, 8)
        self.layer1 = BasicBlock(8, 8)
        self.layer2 = BasicBlock(8, 12, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def residual_cnn(dtype: torch.dtype = torch.float32) -> Example:
    return ResidualCNN().to(dtype), _image(dtype)


# ----- 2. concatenation ----------------------------------------------------------------------------
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
        self.stem = _cbr(3, 6)
        self.branch_a = _cbr(6, 4, k=1)
        self.branch_b1 = _cbr(6, 3, k=1)
        self.branch_b2 = _cbr(3, 5)
        self.pool = nn.MaxPool2d(3, 1, 1)
        self.branch_c = nn.Conv2d(6, 3, 1)
        self.dense = _cbr(6 + 12, 4, k=1)
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
    return ConcatNet().to(dtype), _image(dtype)


# ----- 3. grouped convolutions and group-wise norms -------------------------------------------------
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
        self.stem = _cbr(3, 16)
        self.grouped = _cbr(16, 16, groups=4)
        self.pw1 = _cbr(16, 16, k=1)
        self.dw = _cbr(16, 16, groups=16)
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
    return GroupedConvNet().to(dtype), _image(dtype)


# ----- 4. ShuffleNet -----------------------------------------------------------------------------
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
        self.branch = nn.Sequential(_cbr(half, half, k=1), nn.Conv2d(half, half, 3, 1, 1, groups=half, bias=False),
                                    nn.BatchNorm2d(half), _cbr(half, half, k=1))
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
        self.stem = _cbr(3, 12)
        self.unit1 = ShuffleUnit(12)
        self.unit2 = ShuffleUnit(12, module_shuffle=True)
        self.head = _cbr(12, 10, k=1)
        self.fc = nn.Linear(10, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.unit2(self.unit1(self.stem(x))))
        return self.fc(x.mean((2, 3)))


def shufflenet(dtype: torch.dtype = torch.float32) -> Example:
    return ShuffleNet().to(dtype), _image(dtype)


class ModuleShuffleNet(nn.Module):
    """conv → nn.ChannelShuffle(3) → conv → torch.channel_shuffle(·, 2) → conv: shuffles whose group
    structure nothing else imposes.

    Rules: layout (a channel shuffle op as a one-op chain). Pruning must remove channels in whole
    shuffle rows (one channel from each group), or the shuffle permutes the wrong ones: ``conv1``
    has 12 / 3 = 4 structures, ``conv2`` 6 / 2 = 3.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = _cbr(3, 12)
        self.shuffle = nn.ChannelShuffle(3)
        self.conv2 = _cbr(12, 6, k=1)
        self.conv3 = nn.Conv2d(6, 5, 1)
        self.fc = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv2(self.shuffle(self.conv1(x)))
        x = self.conv3(torch.channel_shuffle(x, 2))
        return self.fc(x.mean((2, 3)))


def module_shuffle_net(dtype: torch.dtype = torch.float32) -> Example:
    return ModuleShuffleNet().to(dtype), _image(dtype)


# ----- 5. squeeze-excite -------------------------------------------------------------------------
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
    return SENet().to(dtype), _image(dtype)


# ----- 6. flatten with spatial extent --------------------------------------------------------------
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
        self.conv = _cbr(3, 6, stride=2)
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
    return FlattenNet(how).to(dtype), _image(dtype)


class FlattenConcatNet(nn.Module):
    """Two conv branches, each flattened (C·H·W), concatenated into one linear layer.

    Rules: layout (two flatten merges), cat, linear. ``fc1.weight`` dim 1 would be indexed by two
    products at once, which a member cannot express yet: both branches are barriers (graph
    building must not fail); the hidden layer stays prunable.
    """

    def __init__(self) -> None:
        super().__init__()
        self.a = _cbr(3, 4, stride=2)
        self.b = _cbr(3, 5, stride=2)
        self.fc1 = nn.Linear((4 + 5) * 4 * 4, 10)
        self.fc2 = nn.Linear(10, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.a(x).flatten(1), self.b(x).flatten(1)], dim=1)
        return self.fc2(F.relu(self.fc1(x)))


def flatten_concat_net(dtype: torch.dtype = torch.float32) -> Example:
    return FlattenConcatNet().to(dtype), _image(dtype)


# ----- 7. functional model -----------------------------------------------------------------------
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
    return FunctionalNet().to(dtype), _image(dtype)


# ----- 8. 1-d, 3-d and transposed convolutions -----------------------------------------------------
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
        self.enc = _cbr(3, 8, stride=2)
        self.up1 = nn.ConvTranspose2d(8, 6, 2, stride=2)
        self.bn = nn.BatchNorm2d(6)
        self.up2 = nn.ConvTranspose2d(6, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up2(F.relu(self.bn(self.up1(self.enc(x)))))


def decoder(dtype: torch.dtype = torch.float32) -> Example:
    return Decoder().to(dtype), _image(dtype)


# ----- 9. text -----------------------------------------------------------------------------------
class TextMLP(nn.Module):
    """nn.Embedding → Linear → ReLU → Linear on int64 token ids (B×T).

    Rules: embedding (weight dim 1 is the embedding dim, role ``value``), linear on 3-d inputs,
    elementwise. Prunable groups (2): the embedding dim and the hidden layer.
    """

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 12)
        self.fc1 = nn.Linear(12, 16)
        self.fc2 = nn.Linear(16, 5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(self.embed(ids))))


def text_mlp(dtype: torch.dtype = torch.float32) -> Example:
    return TextMLP().to(dtype), torch.randint(0, 20, (2, 7))


# ----- 10. transformer MLP block -----------------------------------------------------------------
class MLPBlock(nn.Module):
    """Pre-norm transformer MLP: x + fc2(GELU(fc1(LayerNorm(x)))), then a final LayerNorm and a
    linear head, on B×T×C tokens embedded by a linear layer.

    Rules: layer_norm (inexact on the normalised dim), linear, elementwise (GELU, add). The hidden
    group (``mlp.0``) is prunable and exact; the residual stream (``embed``, ``mlp.2``, both norms)
    is prunable but not exact.
    """

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 16)
        self.norm1 = nn.LayerNorm(16)
        self.mlp = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
        self.norm2 = nn.LayerNorm(16)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        x = x + self.mlp(self.norm1(x))
        return self.head(self.norm2(x))


def mlp_block(dtype: torch.dtype = torch.float32) -> Example:
    return MLPBlock().to(dtype), torch.randn(2, 5, 6, dtype=dtype)


# ----- 11. an op without a rule ------------------------------------------------------------------
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
        self.conv1 = _cbr(3, 8)
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
    return UnknownOpNet().to(dtype), _image(dtype)


# ----- 12. hand-written attention ----------------------------------------------------------------
class Attention(nn.Module):
    """Multi-head self-attention written by hand: qkv linear, chunk into q/k/v, view into heads,
    transpose, F.scaled_dot_product_attention, transpose back, reshape, output projection."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q, k, v = (t.view(b, n, self.heads, c // self.heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(b, n, c))


class TransformerBlock(nn.Module):
    """A pre-norm transformer block (hand-written attention + GELU MLP) between a linear embedding
    and a linear head, on B×T×C tokens.

    Rules: split (chunk), layout (view into heads: a barrier for now), scaled_dot_product_attention,
    layer_norm, linear. The qkv output (and so the projection's input) is a barrier; the MLP hidden
    group stays prunable and exact; the residual stream is prunable but not exact.
    """

    def __init__(self, dim: int = 12, heads: int = 3) -> None:
        super().__init__()
        self.embed = nn.Linear(5, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 20), nn.GELU(), nn.Linear(20, dim))
        self.head = nn.Linear(dim, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        x = x + self.attn(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return self.head(x.mean(1))


def transformer_block(dtype: torch.dtype = torch.float32) -> Example:
    return TransformerBlock().to(dtype), torch.randn(2, 7, 5, dtype=dtype)


# ----- regressions: shared tensors and hard-coded sizes --------------------------------------------
class TiedLM(nn.Module):
    """A language-model head tied to the embedding (``head.weight = embed.weight``, one Parameter
    under two names; ``alias=False`` leaves ``head`` untied) plus a functional readout through the
    same tensor (F.linear(h, embed.weight)).

    Rules: embedding (weight dim 1 produces the embedding dim), linear, linear_functional.
    Topology: the tied tensor's dim 1 makes the embedding channels and consumes the hidden
    channels, so ``embed`` and ``fc`` are one group and the tensor is sliced once.
    """

    def __init__(self, alias: bool = True) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 8)
        self.fc = nn.Linear(8, 8)
        self.head = nn.Linear(8, 11, bias=False)
        if alias:
            self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.fc(self.embed(ids)))
        return self.head(h) + F.linear(h, self.embed.weight)


def tied_lm(dtype: torch.dtype = torch.float32, alias: bool = True) -> Example:
    return TiedLM(alias).to(dtype), torch.randint(0, 11, (2, 5))


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
    return SharedConvNet().to(dtype), _image(dtype, size=4)


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
    return SplitNet().to(dtype), _image(dtype, size=4)


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
        self.conv = _cbr(3, 6)
        self.a = nn.Linear(3, 8)
        self.b = nn.Linear(3, 8)
        self.fc = nn.Linear(16 + 16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spatial = self.conv(x).sum(1).flatten(1)  # (B, H·W)
        tokens = x.flatten(2).transpose(1, 2)  # (B, H·W tokens, 3 features)
        gram = F.relu(self.a(tokens)) @ F.relu(self.b(tokens)).transpose(1, 2)  # (B, H·W, H·W)
        return self.fc(torch.cat([spatial, gram.mean(2)], 1))


def channel_reduce_net(dtype: torch.dtype = torch.float32) -> Example:
    return ChannelReduceNet().to(dtype), _image(dtype, size=4)


MODELS: dict[str, Callable[..., Example]] = {
    "residual_cnn": residual_cnn,
    "concat_net": concat_net,
    "grouped_conv_net": grouped_conv_net,
    "shufflenet": shufflenet,
    "module_shuffle_net": module_shuffle_net,
    "se_net": se_net,
    "flatten_net": flatten_net,
    "flatten_concat_net": flatten_concat_net,
    "functional_net": functional_net,
    "conv1d_net": conv1d_net,
    "conv3d_net": conv3d_net,
    "decoder": decoder,
    "text_mlp": text_mlp,
    "mlp_block": mlp_block,
    "unknown_op_net": unknown_op_net,
    "transformer_block": transformer_block,
    "tied_lm": tied_lm,
    "shared_conv_net": shared_conv_net,
    "split_net": split_net,
    "channel_reduce_net": channel_reduce_net,
}


# ----- fused q|k|v projection split by slicing (issue #21) ----------------------------------------
class FusedQKVSliceNet(nn.Module):
    """One linear makes q|k|v; each is sliced out (``qkv[..., :16]``), viewed into heads and
    transposed, as in Phi-3. Each view splits only the channels its slice keeps, so the layout rule
    must couple just those (the others are not in that output). Not in ``MODELS``: the head split of
    a slice is refused (a barrier), so the projection is not prunable; the model checks that this is
    decided the same way every time."""

    def __init__(self, width: int = 16, head_dim: int = 4) -> None:
        super().__init__()
        self.width, self.head_dim = width, head_dim
        self.qkv = nn.Linear(width, 3 * width)
        self.o = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, w = x.shape[0], x.shape[1], self.width
        qkv = self.qkv(x)
        q, k, v = (qkv[..., i * w:(i + 1) * w].view(b, s, -1, self.head_dim).transpose(1, 2) for i in range(3))
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, s, w)
        return self.o(out)


def fused_qkv_slice_net(dtype: torch.dtype = torch.float32) -> Example:
    torch.manual_seed(0)
    return FusedQKVSliceNet().to(dtype), torch.randn(2, 5, 16, dtype=dtype)
