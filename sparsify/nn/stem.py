"""Space-to-depth: a stride-2 convolution, exactly, as a stride-1 convolution on the input rearranged 2×2 → channels.

``k×k`` stride 2 on ``C`` channels becomes ``⌈k/2⌉×⌈k/2⌉`` stride 1 on ``4·C'`` channels, ``C'`` the input
channels zero-padded so that ``4·C'`` is a multiple of 8 (the aligned fast paths), with the weight rearranged
the same way. :class:`SpaceToDepthConv2d` is a :class:`SpaceToDepth` rearrangement (one padding and one copy
kernel) followed by a plain ``nn.Conv2d``, so that ``sparsify.deploy``'s activation fusion still sees the conv;
:func:`sparsify.deploy.space_to_depth_stems_` inserts it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from sparsify.graph.module_types import register_module_type
from sparsify.measure.timing import cuda_autocast_dtype

__all__ = ["SpaceToDepth", "SpaceToDepthConv2d"]


@register_module_type(leaf=True)
class SpaceToDepth(nn.Module):
    """Zero-pad ``padding`` on each side (one more row/column at the end where the size is odd) and
    ``channels - C`` zero channels, then move every 2×2 pixel block into channels, ordered (row phase,
    column phase, channel). The result is channels_last in memory."""

    def __init__(self, padding: tuple[int, int], channels: int) -> None:
        super().__init__()
        self.padding, self.channels = tuple(padding), int(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (ph, pw), (n, c, h, w) = self.padding, x.shape
        if x.is_cuda and (dtype := cuda_autocast_dtype()) is not None and x.dtype == torch.float32:
            x = x.to(dtype)  # the conv would cast it anyway: rearrange half the bytes
        x = F.pad(x, (pw, pw + (w + 2 * pw) % 2, ph, ph + (h + 2 * ph) % 2, 0, self.channels - c))
        hs, ws = x.shape[2] // 2, x.shape[3] // 2
        x = x.permute(0, 2, 3, 1).reshape(n, hs, 2, ws, 2, self.channels).permute(0, 1, 3, 2, 4, 5)
        return x.reshape(n, hs, ws, 4 * self.channels).permute(0, 3, 1, 2)

    def extra_repr(self) -> str:
        return f"padding={self.padding}, channels={self.channels}"


class SpaceToDepthConv2d(nn.Sequential):
    """``conv`` (odd kernel, stride 2) as :class:`SpaceToDepth` followed by a stride-1 ``nn.Conv2d`` with
    the rearranged weight (``.s2d`` and ``.conv``)."""

    @staticmethod
    def supports(conv: nn.Module, max_in_channels: int | None = None) -> bool:
        """Whether ``conv`` is a plain ``nn.Conv2d`` with stride 2, dilation 1, groups 1, zero padding given as
        numbers, odd kernel sizes of at least 3 and (if given) at most ``max_in_channels`` input channels."""
        return (type(conv) is nn.Conv2d and conv.stride == (2, 2) and conv.dilation == (1, 1) and conv.groups == 1
                and conv.padding_mode == "zeros" and not isinstance(conv.padding, str)
                and (max_in_channels is None or conv.in_channels <= max_in_channels)
                and all(k % 2 == 1 and k >= 3 for k in conv.kernel_size))

    def __init__(self, conv: nn.Conv2d, channel_multiple: int = 8) -> None:
        if not self.supports(conv):
            raise ValueError("SpaceToDepthConv2d needs an nn.Conv2d with stride 2, dilation 1, groups 1, zero padding "
                             f"given as numbers and odd kernel sizes of at least 3; got {conv}")
        c, o = conv.in_channels, conv.out_channels
        step = max(1, channel_multiple) // math.gcd(max(1, channel_multiple), 4)
        padded = -(-c // step) * step  # 4·padded is a multiple of channel_multiple
        kh, kw = ((k + 1) // 2 for k in conv.kernel_size)
        w = conv.weight.detach()
        w = F.pad(w, (0, 2 * kw - w.shape[3], 0, 2 * kh - w.shape[2], 0, padded - c))  # [O, C', 2kh, 2kw]
        w = w.reshape(o, padded, kh, 2, kw, 2).permute(0, 3, 5, 1, 2, 4).reshape(o, 4 * padded, kh, kw)
        inner = nn.Conv2d(4 * padded, o, (kh, kw), bias=conv.bias is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            inner.weight.copy_(w)
            if conv.bias is not None:
                inner.bias.copy_(conv.bias)
        inner.requires_grad_(conv.weight.requires_grad)
        if conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous():
            inner.to(memory_format=torch.channels_last)
        super().__init__()
        self.s2d, self.conv = SpaceToDepth(conv.padding, padded), inner
