"""Element-wise ops: activations, dropout, identity, broadcasting arithmetic, casts."""

from __future__ import annotations

import operator
import re

import torch
import torch.fx as fx
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
    torch.erf, torch.sin, torch.cos, operator.neg, torch.dropout,
    torch.nan_to_num,
)
_ACTIVATION_METHODS = (
    "relu", "sigmoid", "tanh", "abs", "neg", "exp", "sqrt", "rsqrt",
    "square", "clamp", "clip", "erf", "sin", "cos", "contiguous_format", "float", "double",
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
    if ctx.op_name in ("mul", "mul_", "imul", "multiply", "truediv", "div", "div_", "true_divide"):
        _mark_baked_scales(ctx)
    if ctx.op_name in ("truediv", "div", "div_", "true_divide"):
        denominator = ctx.arg(1, "other")
        info = ctx.info(denominator)
        if info is not None:
            for d in range(info.ndim):
                ctx.mark_inexact(ctx.space(denominator, d), f"{ctx.describe()} divides by these channels")


_BAKED = re.compile(r"(^|\.)(lifted_tensor_\d+|_tensor_constant\d+)$")


def _baked_constant(ctx: OpContext, node: fx.Node) -> str:
    """The tensor constant a one-element operand is computed from, if any: a tensor that forward() made
    (``torch.tensor(q.size(-1))``), which torch.export bakes into the graph as ``lifted_tensor_k``; what
    it was computed from (a size that pruning changes?) is lost. "" if none."""
    stack, seen = [node], set()
    while stack:
        n = stack.pop()
        if n.name in seen:
            continue
        seen.add(n.name)
        if n.op == "placeholder":
            return ""
        if n.op == "get_attr" and _BAKED.search(str(n.target)):
            return str(n.target)
        stack.extend(n.all_input_nodes)
    return ""


def _mark_baked_scales(ctx: OpContext) -> None:
    """A product or quotient with a baked one-element constant: the channels of the other operands are
    inexact (DeBERTa scales queries by ``sqrt(query.size(-1))``, which pruning head_dim slots changes)."""
    tensors = ctx.tensor_args()
    for c in tensors:
        info = ctx.info(c)
        constant = _baked_constant(ctx, c) if info is not None and all(s == 1 for s in info.shape) else ""
        if not constant:
            continue
        for t in tensors:
            ti = ctx.info(t)
            for d in range(ti.ndim if t is not c and ti is not None else 0):
                ctx.mark_inexact(ctx.space(t, d), (
                    f"{ctx.describe()} scales by '{constant}', a tensor that forward() creates and torch.export "
                    "bakes in as a constant; if it is computed from a size (torch.tensor(x.size(-1)) ** 0.5) it "
                    "no longer follows pruning"))


register_op_rule(
    "elementwise_unary", unary, modules=_ACTIVATION_MODULES, functions=_ACTIVATION_FUNCTIONS,
    methods=_ACTIVATION_METHODS,
)
register_op_rule(
    "elementwise_binary", binary,
    functions=(operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.sub, torch.subtract,
               torch.mul, torch.multiply, torch.div, torch.true_divide, torch.maximum, torch.minimum, torch.where),
    methods=("add", "sub", "mul", "div", "true_divide", "maximum", "minimum"),  # in place: rules/aten_inplace
)


def shape_query(ctx: OpContext) -> None:
    """Reads only metadata (shape, dim, dtype): no channel coupling; a size computed with (not just
    passed to views) marks its dim inexact. ``getattr`` that yields a tensor is not metadata: see
    :func:`tensor_attribute`."""
    if ctx.node.target is getattr and ctx.out_info is not None and ctx.info(ctx.node.args[0]) is not None:
        tensor_attribute(ctx)  # an attribute of a tensor that is a tensor (not one of an output object)
        return
    mark_width_reads(ctx)


def tensor_attribute(ctx: OpContext) -> None:
    """``x.T`` / ``x.mT`` (``.H`` / ``.mH``, the same for real tensors) permute dims; any other attribute
    that yields a tensor (``x.grad``, ``x.real``) is a barrier for ``x`` and the result, so that ``x``'s
    channels cannot change a shape the graph does not follow (under fx ``x.T`` is ``getattr(x, "T")``)."""
    x, name = ctx.node.args[0], ctx.node.args[1]
    xi, out = ctx.info(x), ctx.out_info
    if out is None or xi is None or name not in ("T", "mT", "H", "mH") or (name in ("mT", "mH") and xi.ndim < 2):
        ctx.block_all(f"{ctx.describe()} reads the tensor attribute {name!r}, which has no channel model")
        return
    perm = list(range(xi.ndim))[::-1] if name in ("T", "H") else [*range(xi.ndim - 2), xi.ndim - 1, xi.ndim - 2]
    for d, source in enumerate(perm):
        ctx.same(ctx.space(x, source), ctx.out(d))


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
