"""Space-to-depth for strided convolutions on few input channels (the stem of most CNNs), for deployment.

A 7×7 stride-2 convolution on 3 input channels (ResNet's stem) cannot use tensor cores well: on an H100
it takes 1.5–1.8 ms at batch 256 and 224×224 whatever its output width, a fixed cost that pruning cannot
lower. The same convolution, exactly, is a stride-1 convolution on the input rearranged 2×2 → channels
(:class:`sparsify.nn.SpaceToDepthConv2d`). :func:`space_to_depth_stems_` swaps every eligible ``nn.Conv2d``
for one. Outputs are equal up to floating-point rounding (the sums run in another order); the MACs grow
(7×7×3 = 147 → 4×4×16 = 256 per output).
"""

from __future__ import annotations

from torch import nn

from sparsify._utils import set_submodule
from sparsify.nn.stem import SpaceToDepthConv2d

__all__ = ["space_to_depth_stems_"]


def space_to_depth_stems_(model: nn.Module, max_in_channels: int = 4, channel_multiple: int = 8) -> list[str]:
    """Swap every ``nn.Conv2d`` with stride 2 on at most ``max_in_channels`` inputs (odd kernel, dilation 1,
    groups 1, zero padding) for a :class:`~sparsify.nn.SpaceToDepthConv2d`, in place. Returns the swapped
    convs' names."""
    swapped = []
    for name, conv in list(model.named_modules()):
        if SpaceToDepthConv2d.supports(conv, max_in_channels):
            set_submodule(model, name, SpaceToDepthConv2d(conv, channel_multiple))
            swapped.append(name)
    return swapped
