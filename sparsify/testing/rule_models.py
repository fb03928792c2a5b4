"""Small models for the op rules and adapters that ``sparsify.testing.models`` does not exercise.

Each builder returns ``(model, example_inputs)`` in the requested dtype, like the builders there, and
names in its docstring the rules (or adapter) it is for. Every model also has an exact prunable group
next to the op under test, so that the exactness oracle prunes something through or around it.
``export_only(builder)`` wraps a model so that fx cannot trace it and the torch.export front end
(ATen-level graphs, the ``aten_*`` rules) is used instead.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sparsify._compat import import_torchvision
from sparsify.testing import sequence_models

Example = tuple[nn.Module, Any]


def _image(dtype: torch.dtype, channels: int = 3, size: int = 6) -> torch.Tensor:
    return torch.randn(2, channels, size, size, dtype=dtype)


class ExportOnly(nn.Module):
    """Runs ``inner`` behind a check on the input's rank: Python control flow on a traced value, which
    torch.fx cannot trace and torch.export (which sees real shapes) can."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, *args: Any) -> Any:
        if args[0].ndim < 1:
            raise ValueError("expected a batched input")
        return self.inner(*args)


def export_only(builder: Callable[..., Example]) -> Callable[..., Example]:
    """The builder's model behind :class:`ExportOnly` (traced by torch.export, not fx)."""

    def build(dtype: torch.dtype = torch.float32) -> Example:
        model, inputs = builder(dtype)
        return ExportOnly(model), inputs

    build.__name__ = f"export_only_{builder.__name__}"
    return build


# ----- assorted layers -----------------------------------------------------------------------------
class AssortedLayers(nn.Module):
    """conv → PReLU → LocalResponseNorm → ZeroPad2d → conv → F.pad → conv → softmax over space →
    F.layer_norm over the last dim → Linear head.

    Rules: prelu, local_response_norm, pad, softmax, layer_norm_functional (and conv, linear)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.act = nn.Conv2d(3, 6, 3, padding=1), nn.PReLU(6)
        self.lrn, self.pad = nn.LocalResponseNorm(2), nn.ZeroPad2d(1)
        self.conv2, self.conv3 = nn.Conv2d(6, 8, 3), nn.Conv2d(8, 5, 1)
        self.fc = nn.Linear(5 * 36, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv2(self.pad(self.lrn(self.act(self.conv1(x)))))
        h = self.conv3(F.relu(F.pad(h, (1, 1, 1, 1))))[..., 1:-1, 1:-1]
        h = F.softmax(h.flatten(2), dim=-1)
        return self.fc(F.layer_norm(h, (36,)).flatten(1))


def assorted_layers(dtype: torch.dtype = torch.float32) -> Example:
    return AssortedLayers().to(dtype), _image(dtype)


class PoolNet(nn.Module):
    """conv → ReLU → max pool → conv → adaptive average pool → Linear (no BatchNorm: under torch.export
    its ATen op has no rule).

    Rules: pool (aten_pool under export), conv."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.fc = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 5, 1), nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.b(F.max_pool2d(F.relu(self.a(x)), 2))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(F.relu(h), 1), 1))


def pool_net(dtype: torch.dtype = torch.float32) -> Example:
    return PoolNet().to(dtype), _image(dtype)


class MaskNet(nn.Module):
    """conv → in-place ReLU → conv, then ``where(g > t, min(g, h), h)`` and a nearest 2× upsample → conv →
    Linear: the ops of VGG (``relu_``) and of masking / resampling heads under torch.export.

    Rules (under export): aten_unary (relu_), aten_binary (gt, min.other, where.self), aten_pool
    (upsample_nearest2d)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 6, 1), nn.Conv2d(6, 6, 3, padding=1), nn.Conv2d(6, 4, 1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x).relu_()
        g = self.b(h)
        h = torch.where(g.gt(0.1), torch.min(g, h), h)
        h = F.interpolate(h, scale_factor=2, mode="nearest")
        return self.fc(self.c(h).mean((2, 3)))


def mask_net(dtype: torch.dtype = torch.float32) -> Example:
    return MaskNet().to(dtype), _image(dtype, size=4)


class NormNet(nn.Module):
    """conv → ReLU → ``h · ‖h‖₂ over space · ‖h‖₃ over channels`` (a global response norm, as in
    ConvNeXt-V2) → conv → Linear.

    Rules: aten_vector_norm (under export; torch.linalg.vector_norm), aten_binary, aten_conv."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.fc = nn.Conv2d(3, 6, 1), nn.Conv2d(6, 4, 1), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.a(x))
        spatial = torch.linalg.vector_norm(h, dim=(2, 3), keepdim=True)
        channels = torch.linalg.vector_norm(h, ord=3, dim=1, keepdim=True)
        return self.fc(self.b(h * spatial * channels).mean((2, 3)))


def norm_net(dtype: torch.dtype = torch.float32) -> Example:
    return NormNet().to(dtype), _image(dtype, size=4)


class ReshapeAsNet(nn.Module):
    """conv → ReLU → ``h.reshape_as(g)`` (g: a second conv's output of the same shape) added to g → conv →
    Linear; the same under torch.export (aten.reshape_as).

    Rules: reshape_as, conv, elementwise_binary."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c, self.fc = (nn.Conv2d(3, 6, 1), nn.Conv2d(6, 6, 1), nn.Conv2d(6, 4, 1),
                                           nn.Linear(4, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.a(x))
        g = self.b(h)
        return self.fc(self.c(g + h.reshape_as(g)).mean((2, 3)))


def reshape_as_net(dtype: torch.dtype = torch.float32) -> Example:
    return ReshapeAsNet().to(dtype), _image(dtype, size=4)


class GroupNormNet(nn.Module):
    """conv → nn.GroupNorm(4 groups of 2) → ReLU → conv → Linear (under export: aten.group_norm).

    Rules: aten_group_norm (whole groups), aten_conv."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.norm, self.b, self.fc = nn.Conv2d(3, 8, 1), nn.GroupNorm(4, 8), nn.Conv2d(8, 4, 1), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.b(F.relu(self.norm(self.a(x)))).mean((2, 3)))


def group_norm_net(dtype: torch.dtype = torch.float32) -> Example:
    return GroupNormNet().to(dtype), _image(dtype, size=4)


class EinsumNet(nn.Module):
    """A conv pair, then torch.einsum (opaque: a barrier) on a third conv's output.

    Rules: opaque, conv."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 6, 1), nn.Conv2d(6, 4, 1), nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c(F.relu(self.b(F.relu(self.a(x)))))
        return torch.einsum("bchw,bdhw->bcd", h, h).flatten(1)


def einsum_net(dtype: torch.dtype = torch.float32) -> Example:
    return EinsumNet().to(dtype), _image(dtype, size=4)


class AddmmNet(nn.Module):
    """Linear → ReLU → torch.addmm with a weight parameter (under export: aten.addmm).

    Rules: aten_addmm, aten_linear."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 8)
        self.weight = nn.Parameter(torch.randn(8, 3))
        self.bias = nn.Parameter(torch.randn(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, F.relu(self.fc(x)), self.weight)


def addmm_net(dtype: torch.dtype = torch.float32) -> Example:
    return AddmmNet().to(dtype), torch.randn(2, 5, dtype=dtype)


class CastNet(nn.Module):
    """Linear → ReLU → ``.to(dtype)`` (under export: aten._assert_tensor_metadata) → Linear.

    Rules: aten_shape_query."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(5, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x)).to(self.fc2.weight.dtype))


def cast_net(dtype: torch.dtype = torch.float32) -> Example:
    return CastNet().to(dtype), torch.randn(2, 5, dtype=dtype)


class FactorPair(nn.Module):
    """Linear → ReLU → a plain factor pair W = B·A (Linear A, Dropout, Linear B) → ReLU → Linear.

    Adapter: low_rank (``factor_pairs``)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.a, self.drop, self.b = nn.Linear(5, 8), nn.Linear(8, 4), nn.Dropout(0.1), nn.Linear(4, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.b(self.drop(self.a(F.relu(self.fc(x)))))))


def factor_pair(dtype: torch.dtype = torch.float32) -> Example:
    return FactorPair().to(dtype), torch.randn(2, 5, dtype=dtype)


# ----- torchvision ops (imported when built) -------------------------------------------------------
def swin_stage(dtype: torch.dtype = torch.float32) -> Example:
    """Linear embedding → torchvision SwinTransformerBlock (shifted 2×2 windows) → PatchMerging → Linear.

    Rules: windowed_attention (a barrier), patch_merging_pad, stochastic_depth, layer_norm."""
    import_torchvision()
    from torchvision.models.swin_transformer import PatchMerging, SwinTransformerBlock

    class SwinStage(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Linear(3, 8)
            self.block = SwinTransformerBlock(8, 2, [2, 2], [1, 1], stochastic_depth_prob=0.0)
            self.merge = PatchMerging(8)
            self.fc = nn.Linear(16, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.merge(self.block(self.embed(x.permute(0, 2, 3, 1)))).mean((1, 2)))

    return SwinStage().to(dtype), _image(dtype, size=4)


def stochastic_depth_net(dtype: torch.dtype = torch.float32) -> Example:
    """conv → residual conv through torchvision.ops.StochasticDepth → Linear, returned in a
    GoogLeNetOutputs named tuple.

    Rules: stochastic_depth, output_tuple (a barrier on the outputs), conv."""
    import_torchvision()
    from torchvision.models.googlenet import GoogLeNetOutputs
    from torchvision.ops import StochasticDepth

    class StochasticDepthNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.fc = nn.Conv2d(3, 6, 1), nn.Conv2d(6, 6, 3, padding=1), nn.Linear(6, 3)
            self.drop_path = StochasticDepth(0.5, "row")

        def forward(self, x: torch.Tensor) -> GoogLeNetOutputs:
            h = F.relu(self.a(x))
            h = h + self.drop_path(self.b(h))
            return GoogLeNetOutputs(self.fc(h.mean((2, 3))), None, None)

    return StochasticDepthNet().to(dtype), _image(dtype, size=4)


MODELS: dict[str, Callable[..., Example]] = {  # with the sequence models
    **sequence_models.MODELS,
    "assorted_layers": assorted_layers,
    "pool_net": pool_net,
    "einsum_net": einsum_net,
    "mask_net": mask_net,
    "norm_net": norm_net,
    "reshape_as_net": reshape_as_net,
    "group_norm_net": group_norm_net,
    "addmm_net": addmm_net,
    "cast_net": cast_net,
    "factor_pair": factor_pair,
    "swin_stage": swin_stage,
    "stochastic_depth_net": stochastic_depth_net,
}
