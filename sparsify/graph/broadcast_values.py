"""Channels whose removed entries stop being zero: a broadcast operand added along the channel dim.

Removing a channel is exact when its (soft-)zeroed entries contribute nothing downstream, or only a
constant that the next layer's bias absorbs (``prune/fold.py``). An element-wise op that *adds* an
operand which has size 1 along the channel dim (``h + h.sum(1, keepdim=True)``, ``scores + mask``)
turns a removed channel's zero into that operand's value: it varies with the input (it is no constant
per channel, so no bias can absorb it) and the consumer that reads it changes its result when the
channel is removed. Such channels are *tainted* here, and the taint follows the couplings the op rules
declare, node by node in graph order:

* an additive op (add, sub, maximum, minimum, where) whose operand depends on the model's inputs and is
  broadcast along an output dim that carries channels taints that output dim;
* a taint passes every coupling a node declares (element-wise ops, layouts, concatenation, norms);
* a product (mul, matmul's batch dims) clears it when another operand's channels on that dim are not
  tainted and carry no offset: a removed channel is zero there, and so is the product (eager attention's
  heads: ``softmax(scores + mask) @ v`` is zero for a removed head, whose ``v`` is zero);
* an *offset* marks spaces whose removed channels may hold a non-zero constant: a parameter-free op on one
  tensor that does not map zero to zero (``sigmoid``, ``cos``, ``x + 1``; tried on zeros) starts it, and it
  follows the couplings like the taint. An offset alone is harmless (``prune/fold.py`` folds constants), but
  an offset operand does not clear a product's taint (``sigmoid(gate(x)) * tainted``: a removed gate
  channel is ``sigmoid(0) = 0.5``, so the product keeps the varying value);
* a tainted space read by a parameter (an ``in`` member: a conv, a linear) or mixed into a sum over
  channels (a sink) makes its group inexact, with a reason that names the op that broke the zeros.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from sparsify.graph.builder import GraphFacts, OpContext, Space
from sparsify.graph.trace import TensorInfo

_ADDITIVE = {"add", "add_", "iadd", "sub", "sub_", "isub", "subtract", "rsub", "maximum", "minimum", "max", "min",
             "where"}
_PRODUCTS = {"mul", "mul_", "imul", "multiply", "matmul", "bmm", "mm"}


class BroadcastValues:
    """Tracks tainted channel spaces while ``collect_facts`` runs the op rules in graph order."""

    def __init__(self, facts: GraphFacts, graph: fx.Graph) -> None:
        self.facts = facts
        self.tainted: dict[Space, str] = {}
        self.offset: set[Space] = set()  # removed channels may hold a non-zero constant
        self._input_dependent: dict[str, bool] = {}  # whether a value is computed from a model input
        for n in graph.nodes:  # graph order is a topological order
            self._input_dependent[n.name] = n.op == "placeholder" or any(
                self._input_dependent.get(a.name, False) for a in n.all_input_nodes)

    def mark(self) -> tuple[int, int, int, int, int]:
        """How much the facts hold before a node's rule runs."""
        f = self.facts
        return len(f.same), len(f.pairs), len(f.merges), len(f.members), len(f.sinks)

    def after_rule(self, ctx: OpContext, before: tuple[int, int, int, int, int]) -> None:
        """Update the taint with what the rule of ``ctx.node`` declared since ``before``."""
        f, node = self.facts, ctx.node
        same, pairs, merges, members, sinks = before
        edges = list(f.same[same:]) + [(a, b) for a, b, _, _ in f.pairs[pairs:]]
        edges += [(factor, m.out) for m in f.merges[merges:] for factor in m.factors]
        neighbours: dict[Space, set[Space]] = {}
        for a, b in edges:
            neighbours.setdefault(a, set()).add(b)
            neighbours.setdefault(b, set()).add(a)
        reached = _reach(neighbours, self.tainted)
        product = ctx.op_name in _PRODUCTS
        for s in [s for s in _reach(neighbours, dict.fromkeys(self.offset, "")) if _is_output(s, node)]:
            if not (product and self._zero_operands(neighbours[s], node)):
                self.offset.add(s)
        for s in [s for s in reached if _is_output(s, node)]:
            if product and self._zero_operands(neighbours[s], node):
                continue  # a removed channel is zero in the clean operand, so in the product
            self.tainted.setdefault(s, reached[s])
        self._sources(ctx)
        self._offset_sources(ctx)
        readers = [(m.space, f"'{m.tensor}' reads them") for m in f.members[members:] if m.role == "in"]
        readers += [(s, f"{f.sinks[s]}") for s in list(f.sinks)[sinks:]]
        for space, what in readers:
            why = self.tainted.get(space) or reached.get(space)
            if why:
                ctx.mark_inexact(space, f"{why}; at {ctx.describe()} {what}, so removing them changes the result")

    def _zero_operands(self, spaces: set[Space], node: fx.Node) -> bool:
        """Whether an operand space of ``node`` is zero on removed channels (neither tainted nor offset)."""
        return any(n not in self.tainted and n not in self.offset and not _is_output(n, node) for n in spaces)

    def _offset_sources(self, ctx: OpContext) -> None:
        """A parameter-free op on one tensor whose result on zeros is not zero: its removed channels hold a
        constant (``sigmoid(0) = 0.5``). Tried on a zero tensor; an op that cannot be tried counts as one."""
        node, out = ctx.node, ctx.out_info
        tensors = ctx.tensor_args()
        if out is None or len(node.all_input_nodes) != 1 or len(tensors) != 1 or ctx.op_name in _PRODUCTS:
            return
        spaces = [(node.name, d) for d in range(out.ndim) if (node.name, d) in self.facts.widths]
        if not spaces or all(s in self.offset for s in spaces):
            return
        if not _maps_zero_to_zero(ctx, tensors[0]):
            self.offset.update(spaces)

    def _sources(self, ctx: OpContext) -> None:
        """An additive op with an input-dependent operand broadcast along an output channel dim."""
        out = ctx.out_info
        if ctx.op_name not in _ADDITIVE or out is None or ctx.node.op == "call_module":
            return
        args = list(ctx.node.args)
        operands = args[1:3] if ctx.op_name == "where" else args
        tensors = [a for a in operands if isinstance(a, fx.Node) and isinstance(ctx.info(a), TensorInfo)]
        if len(tensors) < 2 and ctx.op_name in ("max", "min"):
            return  # a reduction, not the element-wise form
        for t in tensors:
            info = ctx.info(t)
            if not self._depends_on_input(t):
                continue
            for d in range(out.ndim):
                k = d - (out.ndim - info.ndim)
                if out.shape[d] > 1 and (k < 0 or info.shape[k] == 1) and (ctx.node.name, d) in self.facts.widths:
                    self.tainted.setdefault((ctx.node.name, d), (
                        f"{ctx.describe()} adds '{t.name}', which has size 1 along dim {d} (broadcast) and varies "
                        "with the input: a removed channel of that dim becomes its value instead of zero"))

    def _depends_on_input(self, node: fx.Node) -> bool:
        return self._input_dependent.get(node.name, True)


def _reach(neighbours: dict[Space, set[Space]], seeds: dict[Space, str]) -> dict[Space, str]:
    """Spaces connected to a seed by one node's couplings, with the seed's reason."""
    reached: dict[Space, str] = {}
    for seed in [s for s in neighbours if s in seeds]:
        stack = [seed]
        while stack:
            s = stack.pop()
            if s in reached:
                continue
            reached[s] = seeds[seed]
            stack.extend(neighbours.get(s, ()))
    return reached


def _maps_zero_to_zero(ctx: OpContext, operand: fx.Node) -> bool:
    """Run ``ctx.node`` on zeros in place of ``operand`` (on the CPU); modules with parameters or buffers
    produce zeros on removed channels (their members are zeroed with them) and are not run."""
    node, info = ctx.node, ctx.info(operand)
    assert info is not None
    if node.op == "call_module":
        module = ctx.module
        if next(module.parameters(), None) is not None or next(module.buffers(), None) is not None:
            return True
    elif node.op not in ("call_function", "call_method"):
        return True
    zeros = torch.zeros(info.shape, dtype=info.dtype)
    args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda _: zeros)
    # tried on the CPU whatever device the trace names (a meta-device model: .to(device=meta) would give
    # a result without values)
    args, kwargs = torch.utils._pytree.tree_map_only(torch.device, lambda _: torch.device("cpu"), (args, kwargs))
    try:
        with torch.no_grad():
            if node.op == "call_module":
                result = ctx.module(*args, **kwargs)
            elif node.op == "call_method":
                result = getattr(args[0], str(node.target))(*args[1:], **kwargs)
            else:
                result = node.target(*args, **kwargs)
    except Exception:  # an op that cannot run on a plain zero tensor: assume the worst
        return False
    flat, _ = torch.utils._pytree.tree_flatten(result)
    return all(not isinstance(t, torch.Tensor) or not bool(t.ne(0).any()) for t in flat)


def _is_output(space: Space, node: fx.Node) -> bool:
    return space[0] == node.name or space[0].startswith(node.name + ".")
