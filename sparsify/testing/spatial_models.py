"""Constants that reach a window op's spatial dims (issue #21): a buffer image read by a convolution or a
pooling through a layout op. The image's spatial dims are positions, not channels; its channel dim is
one exact group with the convolution's input channels. Each builder returns ``(model, example_inputs)``
in the requested dtype and names the rules it is for."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sparsify.testing.rule_models import Example


class BufferImageConv(nn.Module):
    """``conv(img.unsqueeze(0) * 2)`` (or a max pool first) with ``img`` a buffer of shape (3, 8, 8), the
    result flattened into a linear head and added to the input. Under export the ``unsqueeze`` stays in
    the graph, so the buffer's spatial dims reached the convolution as a prunable group (pruning them
    broke the head's input size); under fx the constant is folded and read directly.

    Rules: conv / aten_conv, pool / aten_pool (the input's spatial dims), layout (unsqueeze), linear."""

    def __init__(self, pool: bool = False) -> None:
        super().__init__()
        self.pool = pool
        self.register_buffer("img", torch.randn(3, 8, 8, generator=torch.Generator().manual_seed(0)))
        self.conv = nn.Conv2d(3, 4, 3)
        self.head = nn.Linear(4 * (2 * 2 if pool else 6 * 6), 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        image = self.img.unsqueeze(0) * 2.0
        y = self.conv(F.max_pool2d(image, 2) if self.pool else image)
        return self.head(y.flatten(1)) + x


def buffer_image_conv(dtype: torch.dtype = torch.float32, pool: bool = False) -> Example:
    return BufferImageConv(pool).to(dtype), torch.randn(1, 2, generator=torch.Generator().manual_seed(1)).to(dtype)
