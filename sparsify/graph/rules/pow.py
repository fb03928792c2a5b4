"""Powers in fx graphs: ``x ** p``, ``torch.pow``, ``Tensor.pow`` (timm's StarReLU, ``s * relu(x) ** 2 + b``).

Element-wise, so every dim of a tensor operand is the output's. A zeroed channel of the base emits
``0 ** p``: 0 for a positive number ``p``, a constant like any other for a number base (``2 ** x``); for a
number ``p <= 0`` (1 or inf) or a tensor exponent (it depends on the exponent's values) the base's
channels are marked inexact, with the reason."""

from __future__ import annotations

import operator

import torch

from sparsify.graph.builder import OpContext
from sparsify.graph.op_rules import register_op_rule
from sparsify.graph.rules.common import couple_elementwise


def power(ctx: OpContext) -> None:
    if ctx.out_info is None:
        return  # powers of Python numbers (shapes)
    base, exponent = ctx.arg(0, "input"), ctx.arg(1, "exponent")
    for t in ctx.tensor_args():
        couple_elementwise(ctx, t)
    info = ctx.info(base)
    if info is None:
        return
    p = ctx.value(exponent)
    if isinstance(p, (int, float)) and not isinstance(p, bool) and p > 0:
        return
    why = (f"{ctx.describe()} raises these channels to the power {p}" if isinstance(p, (int, float))
           else f"{ctx.describe()} raises these channels to a tensor power")
    for d in range(info.ndim):
        ctx.mark_inexact(ctx.space(base, d), f"{why}: a removed channel's 0 ** p is not 0")


register_op_rule("pow", power, functions=(operator.pow, torch.pow), methods=("pow", "pow_", "__pow__"))
