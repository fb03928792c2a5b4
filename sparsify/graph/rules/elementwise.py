"""Element-wise ops: activations, dropout, identity, broadcasting arithmetic, casts."""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import nn

from sparsify.graph.builder import OpContext
from sparsify.graph.op_rules import register_op_rule
from sparsify.graph.rules.common import couple_elementwise
from sparsify.graph.rules.head_dim import mark_width_reads

_ACTIVATION_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid,
    nn.Tanh, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus, nn.Softsign, nn.Tanhshrink,
    nn.LogSigmoid, nn.Hardshrink, nn.Softshrink, nn.Threshold, nn.Identity, nn.Dropout, nn.Dropout1d,
    nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout,
)
_ACTIVATION_FUNCTIONS = (
    F.relu, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu, F.silu, F.mish, F.sigmoid, F.tanh,
    F.hardtanh, F.hardswish, F.hardsigmoid, F.softplus, F.softsign, F.logsigmoid, F.dropout,
    F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, torch.relu, torch.sigmoid, torch.tanh,
    torch.abs, torch.neg, torch.exp, torch.square, torch.sqrt, torch.rsqrt, torch.clamp, torch.clip,
    torch.erf, torch.sin, torch.cos, torch.nn.functional.relu_, operator.neg, torch.dropout,
    torch.nan_to_num,
)
_ACTIVATION_METHODS = (
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "abs", "neg", "exp", "sqrt", "rsqrt",
    "square", "clamp", "clamp_", "clip", "erf", "sin", "cos", "contiguous_format", "float", "double",
    "half", "bfloat16", "to", "type_as", "clone", "detach", "requires_grad_", "nan_to_num",
)


def unary(ctx: OpContext) -> None:
    """Output channel i is input channel i, in every dim."""
    tensors = ctx.tensor_args()
    if tensors and ctx.out_info is not None:
        couple_elementwise(ctx, tensors[0])


def binary(ctx: OpContext) -> None:
    """Broadcasting arithmetic: aligned dims of equal width are the same channels."""
    if ctx.out_info is None:
        return  # arithmetic on Python numbers (shapes)
    for t in ctx.tensor_args():
        couple_elementwise(ctx, t)
    if ctx.op_name in ("truediv", "div", "div_", "true_divide"):
        denominator = ctx.arg(1, "other")
        info = ctx.info(denominator)
        if info is not None:
            for d in range(info.ndim):
                ctx.mark_inexact(ctx.space(denominator, d), f"{ctx.describe()} divides by these channels")


register_op_rule(
    "elementwise_unary", unary, modules=_ACTIVATION_MODULES, functions=_ACTIVATION_FUNCTIONS,
    methods=_ACTIVATION_METHODS,
)
register_op_rule(
    "elementwise_binary", binary,
    functions=(operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.imul,
               operator.isub, torch.add, torch.sub, torch.subtract, torch.mul, torch.multiply, torch.div,
               torch.true_divide, torch.maximum, torch.minimum, torch.where),
    methods=("add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "true_divide", "maximum",
             "minimum"),
)


def shape_query(ctx: OpContext) -> None:
    """Reads only metadata (shape, dim, dtype): no channel coupling; a size computed with (not just
    passed to views) marks its dim inexact."""
    mark_width_reads(ctx)


register_op_rule(
    "shape_query", shape_query, functions=(getattr, torch._assert, operator.eq, operator.ne,
                                           operator.floordiv, operator.mod, operator.lt, operator.le,
                                           operator.gt, operator.ge),
    methods=("size", "dim", "numel", "nelement"),
)


def prelu(ctx: OpContext) -> None:
    """PReLU: element-wise; a per-channel slope is sliced with the channels."""
    unary(ctx)
    if ctx.module.num_parameters > 1:
        x = ctx.tensor_args()[0]
        ctx.member(ctx.space(x, 1), ctx.module_name, "weight", 0, "other")


register_op_rule("prelu", prelu, modules=(nn.PReLU,))
