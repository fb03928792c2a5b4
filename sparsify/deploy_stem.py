"""Space-to-depth for strided convolutions on few input channels (the stem of most CNNs), for deployment.

A 7×7 stride-2 convolution on 3 input channels (ResNet's stem) cannot use tensor cores well: on an H100
it takes 1.5–1.8 ms at batch 256 and 224×224 whatever its output width, a fixed cost that pruning cannot
lower. The same convolution, exactly, is a stride-1 convolution on the input rearranged 2×2 → channels
("space to depth"): ``k×k`` stride 2 on ``C`` channels becomes ``⌈k/2⌉×⌈k/2⌉`` stride 1 on ``4·C`` channels
(zero-padded to a multiple of ``channel_multiple`` so the kernels can use the aligned fast paths), with
the weight rearranged the same way. :func:`space_to_depth_stems_` swaps every eligible ``nn.Conv2d`` of a
model for a :class:`SpaceToDepthConv2d` holding the rearranged weight. Outputs are equal up to
floating-point rounding (the sums run in another order); the MACs grow (7×7×3 = 147 → 4×4×16 = 256 per
output), the time falls where the hardware prefers aligned channels.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from sparsify.graph.trace import register_leaf_module

__all__ = ["SpaceToDepthConv2d", "space_to_depth_stems_"]


def _eligible(conv: nn.Module, max_in_channels: int) -> bool:
    return (type(conv) is nn.Conv2d and conv.stride == (2, 2) and conv.dilation == (1, 1) and conv.groups == 1
            and conv.padding_mode == "zeros" and not isinstance(conv.padding, str)
            and conv.in_channels <= max_in_channels and min(conv.kernel_size) >= 2)


class SpaceToDepthConv2d(nn.Module):
    """``conv`` (stride 2) computed as a stride-1 convolution on the 2×2 space-to-depth of its padded input."""

    def __init__(self, conv: nn.Conv2d, channel_multiple: int = 8) -> None:
        super().__init__()
        if not _eligible(conv, max_in_channels=conv.in_channels):
            raise ValueError("SpaceToDepthConv2d needs an nn.Conv2d with stride 2, dilation 1, groups 1, zero padding "
                             f"given as numbers and a kernel of at least 2; got {conv}")
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.padding = conv.kernel_size, conv.padding
        kh, kw = (math.ceil(k / 2) for k in conv.kernel_size)
        w = conv.weight.detach()
        w = F.pad(w, (0, 2 * kw - w.shape[3], 0, 2 * kh - w.shape[2]))  # [O, C, 2kh, 2kw], zeros at the end
        w = w.reshape(self.out_channels, self.in_channels, kh, 2, kw, 2).permute(0, 3, 5, 1, 2, 4)
        w = w.reshape(self.out_channels, 4 * self.in_channels, kh, kw)  # channel order (row phase, col phase, c)
        self.pad_channels = -(4 * self.in_channels) % max(1, channel_multiple)
        w = F.pad(w, (0, 0, 0, 0, 0, self.pad_channels))
        self.weight = nn.Parameter(w.contiguous(), requires_grad=conv.weight.requires_grad)
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone(),
                                                                requires_grad=conv.bias.requires_grad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (ph, pw), (kh, kw) = self.padding, self.kernel_size
        n, c, h, w = x.shape
        out_h, out_w = (h + 2 * ph - kh) // 2 + 1, (w + 2 * pw - kw) // 2 + 1
        hp, wp = h + 2 * ph, w + 2 * pw
        x = F.pad(x, (pw, pw + wp % 2, ph, ph + hp % 2))
        hs, ws = x.shape[2] // 2, x.shape[3] // 2
        x = x.reshape(n, c, hs, 2, ws, 2).permute(0, 3, 5, 1, 2, 4).reshape(n, 4 * c, hs, ws)
        if self.pad_channels:
            x = F.pad(x, (0, 0, 0, 0, 0, self.pad_channels))
        if self.weight.is_contiguous(memory_format=torch.channels_last):
            x = x.contiguous(memory_format=torch.channels_last)
        y = F.conv2d(x, self.weight, self.bias)
        return y[:, :, :out_h, :out_w]

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride=(2, 2), "
                f"padding={self.padding}, as {tuple(self.weight.shape[2:])} on {self.weight.shape[1]} channels")


register_leaf_module(SpaceToDepthConv2d)  # traced as one call (deploy traces after the swap to fuse activations)


def space_to_depth_stems_(model: nn.Module, max_in_channels: int = 4, channel_multiple: int = 8) -> list[str]:
    """Swap every ``nn.Conv2d`` with stride 2 on at most ``max_in_channels`` inputs (dilation 1, groups 1,
    zero padding) for a :class:`SpaceToDepthConv2d`, in place. Returns the names of the swapped convs."""
    swapped = []
    for name, conv in list(model.named_modules()):
        if _eligible(conv, max_in_channels):
            parent, _, attr = name.rpartition(".")
            new = SpaceToDepthConv2d(conv, channel_multiple).to(conv.weight.device)
            if conv.weight.is_contiguous(memory_format=torch.channels_last) and conv.weight.dim() == 4:
                new = new.to(memory_format=torch.channels_last)
            setattr(model.get_submodule(parent) if parent else model, attr, new)
            swapped.append(name)
    return swapped
