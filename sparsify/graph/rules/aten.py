"""ATen overloads, as they appear in graphs from ``torch.export`` (Hugging Face models).

They reuse the rules of the torch functions with the same signatures; ``embedding`` (weight first)
and the batch norms (affine before statistics; the ``_native`` ones return a tuple) need their own.
"""

from __future__ import annotations

import torch
from torch import nn

from sparsify._utils import owner_of
from sparsify.graph.builder import OpContext
from sparsify.graph.op_rules import register_op_rule
from sparsify.graph.rules import elementwise, layers, layout, structural
from sparsify.graph.rules.common import argument_members, couple_dims, couple_elementwise, couple_whole_groups
from sparsify.graph.trace import TensorInfo

aten = torch.ops.aten


def _overloads(*packets: object) -> tuple[object, ...]:
    out = []
    for packet in packets:
        for name in packet.overloads():
            out.append(getattr(packet, name))
    return tuple(out)


def embedding(ctx: OpContext) -> None:
    """aten.embedding(weight, indices): the embedding dim is weight dim 1."""
    weight, ids = ctx.node.args[0], ctx.node.args[1]
    xi = ctx.info(ids)
    if xi is None or ctx.out_info is None:
        return
    couple_dims(ctx, ids, range(xi.ndim))
    if not ctx.param_member(weight, 1, ctx.out(-1), "out"):
        ctx.block_all(f"{ctx.describe()}: the embedding table is computed, not a parameter")


def batch_norm(ctx: OpContext) -> None:
    """aten.batch_norm / native_batch_norm / _native_batch_norm_legit(_no_training)(input, weight, bias,
    running_mean, running_var, ...): per-channel affine and statistics on channel dim 1 of the output
    (of its element 0 where the op returns (output, save_mean, save_invstd))."""
    x = ctx.node.args[0]
    xi = ctx.info(x)
    element = None if isinstance(ctx.value(ctx.node), TensorInfo) else 0
    if xi is None:
        return
    for d in range(xi.ndim):
        ctx.same(ctx.space(x, d), ctx.out(d, element))
    space = ctx.out(1, element)
    argument_members(ctx, space, [(1, "weight", "scale"), (2, "bias", "bias"),
                                  (3, "running_mean", "stat"), (4, "running_var", "stat")])


def group_norm(ctx: OpContext) -> None:
    """aten.group_norm(input, num_groups, weight, bias, ...): as the fx ``group_norm`` rule (a structure is
    one whole group) when weight and bias are an nn.GroupNorm's own, whose num_groups is re-synced after
    pruning; a functional call (its group count written in the code) or one without affine parameters is
    a barrier."""
    x, groups = ctx.node.args[0], ctx.value(ctx.arg(1, "num_groups"))
    weight, bias = ctx.param_name(ctx.arg(2, "weight")), ctx.param_name(ctx.arg(3, "bias"))
    module = None
    if weight is not None and weight.endswith(".weight"):
        owner, _ = owner_of(ctx.traced.model, weight)
        if isinstance(owner, nn.GroupNorm) and owner.affine and bias == weight[:-len("weight")] + "bias":
            module = owner
    if module is None or not isinstance(groups, int) or groups != module.num_groups:
        ctx.block_all(f"{ctx.describe()}: not an affine nn.GroupNorm's own call, so its group count cannot be "
                      "re-synced after pruning; use nn.GroupNorm(num_groups, channels)")
        return
    couple_elementwise(ctx, x)
    space = ctx.out(1)
    couple_whole_groups(ctx, space, module.num_channels, module.num_groups)
    argument_members(ctx, space, [(2, "weight", "scale"), (3, "bias", "bias")])


def vector_norm(ctx: OpContext) -> None:
    """aten.linalg_vector_norm(x, ord=2, dim=None, keepdim=False): kept dims pass through; a reduced dim
    is a sum of ``|x|^ord`` (a sink: an all-zero channel adds nothing) for ``ord > 0`` (``inf``: a max of
    ``|x|``, also unchanged by zeros); other orders (``ord <= 0``, ``-inf``) are changed by zeros: inexact."""
    x = ctx.node.args[0]
    xi, out = ctx.info(x), ctx.out_info
    if xi is None or out is None:
        return
    order = ctx.value(ctx.arg(1, "ord", 2))
    dims = ctx.value(ctx.arg(2, "dim"))
    keepdim = bool(ctx.value(ctx.arg(3, "keepdim", False)))
    dims = range(xi.ndim) if dims is None else dims if isinstance(dims, (list, tuple)) else [dims]
    reduced = {d % xi.ndim for d in dims}
    zero_neutral = isinstance(order, (int, float)) and order > 0
    j = 0
    for d in range(xi.ndim):
        if d in reduced:
            if not zero_neutral:
                ctx.mark_inexact(ctx.space(x, d), f"{ctx.describe()} takes a norm of order {order} over dim {d}")
            ctx.sink(ctx.space(x, d), f"{ctx.describe()} sums |x|^{order} over dim {d}")
            j += keepdim
            continue
        ctx.same(ctx.space(x, d), ctx.out(j))
        j += 1


register_op_rule("aten_batch_norm", batch_norm, functions=_overloads(
    aten.batch_norm, aten.native_batch_norm, aten._native_batch_norm_legit,
    aten._native_batch_norm_legit_no_training))
register_op_rule("aten_group_norm", group_norm, functions=_overloads(aten.group_norm))
register_op_rule("aten_vector_norm", vector_norm, functions=_overloads(aten.linalg_vector_norm))
register_op_rule("aten_embedding", embedding, functions=_overloads(aten.embedding))
register_op_rule("aten_unary", elementwise.unary, functions=_overloads(
    aten.relu, aten.relu_, aten.relu6, aten.gelu, aten.silu, aten.sigmoid,
    aten.tanh, aten.neg, aten.rsqrt, aten.sqrt, aten.exp, aten.pow, aten.cos, aten.sin, aten.abs,
    aten.hardswish, aten.hardsigmoid, aten.leaky_relu, aten.elu, aten.mish, aten.dropout, aten.clone,
    aten.alias, aten._to_copy, aten.to, aten.contiguous, aten.clamp, aten.square))
# min/max only as .other (the others reduce); where without .default (the one-argument nonzero form)
register_op_rule("aten_binary", elementwise.binary, functions=(*_overloads(
    aten.add, aten.sub, aten.mul, aten.div, aten.maximum, aten.minimum, aten.gt, aten.lt, aten.ge, aten.le,
    aten.eq, aten.ne), aten.min.other, aten.max.other, aten.where.self, aten.where.ScalarOther,
    aten.where.ScalarSelf, aten.where.Scalar))
register_op_rule("aten_shape_query", elementwise.shape_query, functions=_overloads(
    aten._assert_tensor_metadata, aten.sym_size, aten.sym_numel, aten._assert_async, aten.sym_constrain_range_for_size))
register_op_rule("aten_linear", layers.linear_functional, functions=_overloads(aten.linear))
register_op_rule("aten_conv", layers.conv_functional, functions=_overloads(aten.conv1d, aten.conv2d, aten.conv3d))
register_op_rule("aten_layer_norm", layers.layer_norm_functional, functions=_overloads(aten.layer_norm))
register_op_rule("aten_pool", layers.pool, functions=_overloads(
    aten.adaptive_avg_pool1d, aten.adaptive_avg_pool2d, aten.avg_pool2d, aten.max_pool2d, aten.upsample_nearest2d))
register_op_rule("aten_cat", structural.cat, functions=_overloads(aten.cat))
register_op_rule("aten_split", structural.split, functions=_overloads(aten.chunk, aten.split,
                                                                        aten.split_with_sizes))
register_op_rule("aten_reduction", structural.reduction, functions=_overloads(aten.mean, aten.sum, aten.amax))
register_op_rule("aten_softmax", structural.softmax, functions=_overloads(aten.softmax, aten._softmax,
                                                                          aten.log_softmax))
register_op_rule("aten_matmul", structural.matmul, functions=_overloads(aten.matmul, aten.bmm, aten.mm))
register_op_rule("layout_aten", layout.layout, functions=_overloads(
    aten.view, aten.reshape, aten._unsafe_view, aten.transpose, aten.permute, aten.unsqueeze, aten.squeeze,
    aten.expand, aten.slice, aten.select, aten.t, aten.flatten, aten.unflatten, aten.repeat, aten.numpy_T))
