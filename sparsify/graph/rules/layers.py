"""Parameterised layers: convolutions, linear, normalisation, embedding, pooling, attention."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from sparsify._utils import owner_of
from sparsify.graph.builder import OpContext, Space
from sparsify.graph.op_rules import register_op_rule
from sparsify.graph.rules.common import (
    argument_members,
    couple_dims,
    couple_elementwise,
    couple_whole_groups,
    module_param_members,
)

Member = Callable[[Space | None, str, int, str], None]  # member(space, tensor name, dim, role)


def _module_member(ctx: OpContext) -> Member:
    """``member(space, name, dim, role)`` for the called module's own tensors (an absent bias is skipped)."""
    m = ctx.module

    def member(space: Space | None, name: str, dim: int, role: str) -> None:
        if getattr(m, name, None) is not None:
            ctx.member(space, ctx.module_name, name, dim, role)

    return member


def _argument_member(ctx: OpContext, weight: Any, bias: Any) -> Member:
    """``member(space, name, dim, role)`` for the ``weight``/``bias`` arguments of a functional call."""

    def member(space: Space | None, name: str, dim: int, role: str) -> None:
        arg = weight if name == "weight" else bias
        if arg is not None:
            ctx.param_member(arg, dim, space, role)

    return member


def _parameter_arguments(ctx: OpContext) -> tuple[Any, Any] | None:
    """(weight, bias) of ``F.conv*``/``F.linear`` if both are parameters (or bias is None), else every
    dim is blocked and None is returned."""
    weight, bias = ctx.arg(1, "weight"), ctx.arg(2, "bias")
    if ctx.param_name(weight) is None or (bias is not None and ctx.param_name(bias) is None):
        ctx.block_all(f"{ctx.describe()}: weight is computed, not a parameter")
        return None
    return weight, bias


def _grouped_pairs(ctx: OpContext, x_space: Space | None, out_space: Space | None, groups: int) -> None:
    """Whole conv groups are the structures: group k's inputs and outputs are removed together."""
    if x_space is None or out_space is None:
        return
    cin, cout = ctx.facts.widths[x_space], ctx.facts.widths[out_space]
    a, b = cin // groups, cout // groups
    ctx.pairs(x_space, out_space, np.arange(cin), (np.arange(cin) // a) * b)
    ctx.pairs(out_space, out_space, (np.arange(cout) // b) * b, np.arange(cout))


def block_spatial_inputs(ctx: OpContext, x: Any, cdim: int) -> None:
    """The input dims after the channel dim are positions a window slides over, not channels: declared
    barriers, or a constant that reaches them through a layout op (a buffer image ``img.unsqueeze(0)``)
    would stay a prunable group whose removal shrinks the output's spatial size unseen."""
    xi = ctx.info(x)
    for d in range(cdim + 1, xi.ndim if xi is not None else 0):
        ctx.block(ctx.space(x, d), f"{ctx.describe()} reads dim {d} as spatial positions (not channels)")


def _conv_core(ctx: OpContext, x, weight_ndim: int, groups: int, transposed: bool, member,
               hard_groups: bool = False) -> None:
    out, xi = ctx.out_info, ctx.info(x)
    if out is None or xi is None:
        return
    cdim = xi.ndim - (weight_ndim - 2) - 1  # 1 for batched input, 0 for unbatched
    if cdim == 1:
        ctx.same(ctx.space(x, 0), ctx.out(0))
    for d in range(cdim + 1, out.ndim):
        ctx.fresh(ctx.out(d), f"{ctx.describe()} creates spatial dim {d}")
    block_spatial_inputs(ctx, x, cdim)
    x_space, out_space = ctx.space(x, cdim), ctx.out(cdim)
    cin, cout = xi.shape[cdim], out.shape[cdim]
    if groups == 1:
        member(x_space, "weight", 0 if transposed else 1, "in")
        member(out_space, "weight", 1 if transposed else 0, "out")
        member(out_space, "bias", 0, "bias")
    elif transposed:
        ctx.block(x_space, f"{ctx.describe()}: grouped transposed convolution is not supported yet")
        ctx.block(out_space, f"{ctx.describe()}: grouped transposed convolution is not supported yet")
    elif groups == cin == cout:
        ctx.same(x_space, out_space)
        member(out_space, "weight", 0, "out")
        member(out_space, "bias", 0, "bias")
    else:
        _grouped_pairs(ctx, x_space, out_space, groups)
        member(out_space, "weight", 0, "out")
        member(out_space, "bias", 0, "bias")
    if hard_groups and groups > 1:
        reason = (f"{ctx.describe()}: groups={groups} is a constant in the model's code and would not follow "
                  "pruning; compute it from the input (groups=x.shape[1]) or use an nn.ConvNd")
        ctx.block(x_space, reason)
        ctx.block(out_space, reason)


def conv(ctx: OpContext) -> None:
    """nn.ConvNd / ConvTransposeNd: in-channels ↔ weight dim 1, out-channels ↔ weight dim 0.

    Grouped convolutions couple each group's inputs and outputs (a structure is a whole group);
    depthwise convolutions couple input channel c with output channel c.
    """
    m = ctx.module
    transposed = isinstance(m, nn.modules.conv._ConvTransposeNd)
    _conv_core(ctx, ctx.node.args[0], m.weight.ndim, m.groups, transposed, _module_member(ctx))


register_op_rule("conv", conv, modules=(nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d,
                                        nn.ConvTranspose2d, nn.ConvTranspose3d))


def _groups_follow_pruning(ctx: OpContext, groups_arg: Any, weight: Any) -> bool:
    """Whether a functional conv's group count changes with its channels: computed from a shape, or the
    ``groups`` of the nn.ConvNd whose weight it reads (torch.export writes that attribute as a constant;
    the conv's attribute sync re-derives it after slicing)."""
    if isinstance(groups_arg, fx.Node):
        return True
    name = ctx.param_name(weight)
    try:
        owner, attr = owner_of(ctx.traced.model, name) if name is not None else (None, "")
    except AttributeError:
        return False
    return attr == "weight" and isinstance(owner, nn.modules.conv._ConvNd)


def conv_functional(ctx: OpContext) -> None:
    """F.convNd with a weight read from a parameter. A group count written as a constant (a blur
    filter's ``groups=self.channels``) would go stale after pruning: its channels are blocked."""
    groups_arg = ctx.arg(6, "groups", 1)
    groups = ctx.value(groups_arg)
    params = _parameter_arguments(ctx)
    if params is None:
        return
    weight, bias = params
    _conv_core(ctx, ctx.node.args[0], ctx.info(weight).ndim, int(groups), False, _argument_member(ctx, weight, bias),
               hard_groups=not _groups_follow_pruning(ctx, groups_arg, weight))


register_op_rule("conv_functional", conv_functional, functions=(F.conv1d, F.conv2d, F.conv3d))


def _linear_core(ctx: OpContext, x, member) -> None:
    xi, out = ctx.info(x), ctx.out_info
    if xi is None or out is None:
        return
    couple_dims(ctx, x, range(xi.ndim - 1))
    member(ctx.space(x, -1), "weight", 1, "in")
    member(ctx.out(-1), "weight", 0, "out")
    member(ctx.out(-1), "bias", 0, "bias")


def linear(ctx: OpContext) -> None:
    """nn.Linear: input features ↔ weight dim 1, output features ↔ weight dim 0 and bias."""
    _linear_core(ctx, ctx.node.args[0], _module_member(ctx))


register_op_rule("linear", linear, modules=(nn.Linear,))


def linear_functional(ctx: OpContext) -> None:
    """F.linear with weight (and bias) read from parameters."""
    params = _parameter_arguments(ctx)
    if params is not None:
        _linear_core(ctx, ctx.node.args[0], _argument_member(ctx, *params))


register_op_rule("linear_functional", linear_functional, functions=(F.linear,))


def batch_norm(ctx: OpContext) -> None:
    """BatchNorm / InstanceNorm: per-channel affine and statistics (channel dim 1)."""
    x = ctx.node.args[0]
    couple_elementwise(ctx, x)
    space = ctx.out(1)
    m = ctx.module
    if getattr(m, "weight", None) is None and getattr(m, "running_mean", None) is None:
        ctx.block(space, f"{ctx.describe()} has neither affine parameters nor running statistics, "
                         "so num_features cannot be re-synced")
    module_param_members(ctx, space, [("weight", 0, "scale"), ("bias", 0, "bias"),
                                      ("running_mean", 0, "stat"), ("running_var", 0, "stat")])


register_op_rule("batch_norm", batch_norm, modules=(
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.InstanceNorm1d,
    nn.InstanceNorm2d, nn.InstanceNorm3d,
))


def batch_norm_functional(ctx: OpContext) -> None:
    """F.batch_norm with statistics and affine read from parameters and buffers."""
    x = ctx.node.args[0]
    couple_elementwise(ctx, x)
    space = ctx.out(1)
    argument_members(ctx, space, [(1, "running_mean", "stat"), (2, "running_var", "stat"),
                                  (3, "weight", "scale"), (4, "bias", "bias")])


register_op_rule("batch_norm_functional", batch_norm_functional, functions=(F.batch_norm,))


def group_norm(ctx: OpContext) -> None:
    """GroupNorm: a structure is one whole group of channels, so group statistics stay exact."""
    m: nn.GroupNorm = ctx.module
    x = ctx.node.args[0]
    if not m.affine:
        ctx.block_all(f"{ctx.describe()} has no affine parameters, so num_channels cannot be re-synced")
        return
    couple_elementwise(ctx, x)
    space = ctx.out(1)
    couple_whole_groups(ctx, space, m.num_channels, m.num_groups)
    module_param_members(ctx, space, [("weight", 0, "scale"), ("bias", 0, "bias")])


register_op_rule("group_norm", group_norm, modules=(nn.GroupNorm,))


def _layer_norm_core(ctx: OpContext, x, k: int, describe: str, member) -> None:
    xi = ctx.info(x)
    if xi is None:
        return
    couple_elementwise(ctx, x)
    for i in range(k):
        d = xi.ndim - k + i
        ctx.mark_inexact(ctx.out(d), f"{describe} normalises over this dim: removing channels, even "
                                     "all-zero ones, changes its mean and variance")
        member(ctx.out(d), "weight", i, "scale")
        member(ctx.out(d), "bias", i, "bias")


def layer_norm(ctx: OpContext) -> None:
    """LayerNorm / RMSNorm over the last dims: affine sliced; pruning is approximate there."""
    m = ctx.module
    shape = m.normalized_shape
    if getattr(m, "weight", None) is None:
        ctx.block_all(f"{ctx.describe()} has no affine parameters, so its normalized_shape cannot "
                      "be kept in sync with pruned widths")
        return
    _layer_norm_core(ctx, ctx.node.args[0], len(shape), ctx.describe(), _module_member(ctx))


_NORMS = [nn.LayerNorm] + ([nn.RMSNorm] if hasattr(nn, "RMSNorm") else [])
register_op_rule("layer_norm", layer_norm, modules=tuple(_NORMS))


def layer_norm_functional(ctx: OpContext) -> None:
    """F.layer_norm: like LayerNorm when its affine parameters belong to an nn.LayerNorm.

    The normalised shape is a constant in the call; sparsify can only keep it right if it is the
    ``normalized_shape`` attribute of an nn.LayerNorm whose weight is passed (it is re-synced).
    """
    x, shape, weight, bias = ctx.node.args[0], ctx.value(ctx.arg(1, "normalized_shape")), \
        ctx.arg(2, "weight"), ctx.arg(3, "bias")
    k = len(shape)
    owner = None
    name = ctx.param_name(weight)
    if name is not None:
        owner = ctx.traced.model.get_submodule(name.rpartition(".")[0])
    if not isinstance(owner, nn.LayerNorm):
        ctx.block_all(f"{ctx.describe()}: normalized_shape is a constant not tied to an nn.LayerNorm")
        return
    _layer_norm_core(ctx, x, k, ctx.describe(), _argument_member(ctx, weight, bias))


register_op_rule("layer_norm_functional", layer_norm_functional, functions=(F.layer_norm,))


def local_response_norm(ctx: OpContext) -> None:
    """LocalResponseNorm mixes neighbouring channels."""
    couple_elementwise(ctx, ctx.node.args[0])
    ctx.mark_inexact(ctx.out(1), f"{ctx.describe()} mixes neighbouring channels")


register_op_rule("local_response_norm", local_response_norm, modules=(nn.LocalResponseNorm,))


def embedding(ctx: OpContext) -> None:
    """nn.Embedding: the embedding dim is weight dim 1; index dims pass through."""
    ids, out = ctx.node.args[0], ctx.out_info
    xi = ctx.info(ids)
    if xi is None or out is None:
        return
    couple_dims(ctx, ids, range(xi.ndim))
    ctx.member(ctx.out(-1), ctx.module_name, "weight", 1, "out")


register_op_rule("embedding", embedding, modules=(nn.Embedding,))


def pool(ctx: OpContext) -> None:
    """Pooling and resampling: batch and channel dims pass through, spatial dims are new."""
    x, out = ctx.tensor_args()[0], ctx.out_info
    xi = ctx.info(x)
    if xi is None or out is None:
        return
    spatial = _spatial_dims(ctx)
    cdim = xi.ndim - spatial - 1
    couple_dims(ctx, x, range(cdim + 1))
    for d in range(cdim + 1, out.ndim):
        ctx.fresh(ctx.out(d), f"{ctx.describe()} creates spatial dim {d}")
    block_spatial_inputs(ctx, x, cdim)


def _spatial_dims(ctx: OpContext) -> int:
    if ctx.node.op == "call_module":
        name = type(ctx.module).__name__
    else:
        name = getattr(ctx.node.target, "__name__", "")
    for k in (1, 2, 3):
        if f"{k}d" in name:
            return k
    xi = ctx.info(ctx.tensor_args()[0])
    return max(xi.ndim - 2, 1) if xi is not None else 2


register_op_rule(
    "pool", pool,
    modules=(nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
             nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
             nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.LPPool1d, nn.LPPool2d, nn.Upsample,
             nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d),
    functions=(F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
               F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
               F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.interpolate,
               torch.max_pool1d, torch.max_pool2d, torch.avg_pool1d, torch.adaptive_avg_pool1d),
)


def attention_barrier(ctx: OpContext) -> None:
    """Layers whose internal widths are tied to their inputs' widths (barrier for now)."""
    ctx.block_all(f"{ctx.describe()} ties its internal widths (heads, hidden units) to its "
                  "inputs; pruning through it is not supported yet")


register_op_rule("attention_barrier", attention_barrier,
                 modules=(nn.MultiheadAttention,  # RNNs: rules/rnn.py, RNN cells: rules/rnn_cells.py
                          nn.Bilinear, nn.EmbeddingBag, nn.TransformerEncoderLayer,
                          nn.TransformerDecoderLayer))


def pad(ctx: OpContext) -> None:
    """Padding: padded dims are new, the others pass through."""
    x, out = ctx.tensor_args()[0], ctx.out_info
    xi = ctx.info(x)
    if xi is None or out is None:
        return
    if ctx.node.op == "call_module":
        p = ctx.module.padding
        padded = len(p) // 2 if isinstance(p, tuple) and len(p) > 1 else ctx.info(x).ndim - 2
    else:
        padded = len(ctx.value(ctx.arg(1, "pad"))) // 2
    for d in range(xi.ndim):
        if d >= xi.ndim - padded:
            ctx.fresh(ctx.out(d), f"{ctx.describe()} pads dim {d}")
            ctx.block(ctx.space(x, d), f"{ctx.describe()} pads dim {d}")
        else:
            ctx.same(ctx.space(x, d), ctx.out(d))


register_op_rule("pad", pad, functions=(F.pad,), modules=(
    nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d,
    nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d, nn.ReplicationPad1d,
    nn.ReplicationPad2d, nn.ReplicationPad3d,
))
