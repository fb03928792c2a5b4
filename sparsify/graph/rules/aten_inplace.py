"""In-place ops (``x.add_(y)``, ``x /= s``, ``h.sigmoid_()``; fx methods and the ATen ops torch.export keeps), and
``aten.hardtanh``.

An in-place op is the element-wise op on its result only if nothing else sees the mutation: the
mutated tensor is not a view of another one (the write would land in the base), not a parameter or
model input, and every other reader of it reads before the op. Otherwise the op is a barrier, with
the reason named; a mutation the graph cannot follow is never treated as element-wise.
"""

from __future__ import annotations

import operator
from collections.abc import Callable

import torch
import torch.fx as fx
import torch.nn.functional as F

from sparsify.graph.builder import OpContext
from sparsify.graph.op_rules import register_op_rule
from sparsify.graph.rules.aten import _overloads
from sparsify.graph.rules.elementwise import binary, unary
from sparsify.graph.rules.layout_chain import is_layout

aten = torch.ops.aten


def mutation_seen_elsewhere(ctx: OpContext) -> str:
    """Why the mutation of ``ctx.node``'s first argument is visible beyond the op's result ("" if not)."""
    x = ctx.node.args[0]
    if not isinstance(x, fx.Node):
        return "it mutates a value that is not a traced tensor"
    if x.op in ("placeholder", "get_attr"):
        return f"it mutates '{x.name}', a model input or parameter"
    if is_layout(x, ctx):
        return f"it mutates '{x.name}', a view of another tensor"
    readers = {u for u in x.users if u is not ctx.node}
    node = ctx.node.prev
    while readers and node is not x and node.op != "root":
        readers.discard(node)
        node = node.prev
    if readers:
        return f"'{x.name}' is read after the op by {', '.join(sorted(u.name for u in readers))}"
    return ""


def _in_place(rule: Callable[[OpContext], None]) -> Callable[[OpContext], None]:
    def apply(ctx: OpContext) -> None:
        why = mutation_seen_elsewhere(ctx)
        if why:
            ctx.block_all(f"{ctx.describe()} works in place and {why}; write it out of place (x = x + y)")
            return
        rule(ctx)

    apply.__doc__ = f"In place: {rule.__doc__}"
    return apply


inplace_binary = _in_place(binary)
inplace_unary = _in_place(unary)

register_op_rule("binary_inplace", inplace_binary, functions=(
    *_overloads(aten.add_, aten.sub_, aten.mul_, aten.div_), operator.iadd, operator.isub, operator.imul,
    operator.itruediv), methods=("add_", "sub_", "mul_", "div_"))
register_op_rule("unary_inplace", inplace_unary, functions=(
    *_overloads(aten.hardtanh_, aten.silu_, aten.sigmoid_, aten.tanh_, aten.gelu_, aten.clamp_), F.relu_),
    methods=("relu_", "sigmoid_", "tanh_", "clamp_"))
register_op_rule("aten_hardtanh", unary, functions=_overloads(aten.hardtanh))
