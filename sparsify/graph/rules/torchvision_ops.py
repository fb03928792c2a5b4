"""Rules for functions that torchvision models call through ``torch.fx.wrap`` (no import needed)."""

from __future__ import annotations

import numpy as np

from sparsify.graph.builder import OpContext
from sparsify.graph.op_rules import register_op_rule
from sparsify.graph.rules.common import couple_elementwise


def stochastic_depth(ctx: OpContext) -> None:
    """Drops whole samples (identity in eval): element-wise on its input."""
    couple_elementwise(ctx, ctx.node.args[0])


register_op_rule("stochastic_depth", stochastic_depth,
                 functions=("torchvision.ops.stochastic_depth.stochastic_depth",))


def patch_merging_pad(ctx: OpContext) -> None:
    """Swin's patch merging: pads H and W of (..., H, W, C) to even sizes and concatenates the four
    2×2 sub-grids along channels, so input channel c is output channels c, C+c, 2C+c and 3C+c."""
    x = ctx.node.args[0]
    xi, out = ctx.info(x), ctx.out_info
    if xi is None or out is None:
        return
    c = xi.shape[-1]
    if out.shape[-1] != 4 * c:
        ctx.block_all(f"{ctx.describe()}: expected 4×{c} output channels, got {out.shape[-1]}")
        return
    channels = np.arange(c)
    ctx.pairs(ctx.space(x, -1), ctx.out(-1), np.tile(channels, 4), np.concatenate([k * c + channels for k in range(4)]))
    for d in range(xi.ndim - 1):
        if d < xi.ndim - 3:
            ctx.same(ctx.space(x, d), ctx.out(d))
        else:
            ctx.fresh(ctx.out(d), f"{ctx.describe()} merges 2×2 patches of spatial dim {d}")


register_op_rule("patch_merging_pad", patch_merging_pad,
                 functions=("torchvision.models.swin_transformer._patch_merging_pad",))


def windowed_attention(ctx: OpContext) -> None:
    """Swin's fused window attention derives its head size from its input width: a barrier."""
    ctx.block_all(f"{ctx.describe()} derives its head size from its input width; pruning through "
                  "it is not supported yet")


register_op_rule("windowed_attention", windowed_attention, functions=(
    "torchvision.models.swin_transformer.shifted_window_attention",
    "torchvision.models.swin_transformer._get_relative_position_bias",
))


def output_tuple(ctx: OpContext) -> None:
    """Named-tuple constructors of model outputs: their elements are model outputs."""
    ctx.block_all(f"{ctx.describe()} builds the model's output")


register_op_rule("output_tuple", output_tuple, functions=(
    "torchvision.models.googlenet.GoogLeNetOutputs", "torchvision.models.inception.InceptionOutputs",
))
