"""Run the op rules over a traced graph and collect their declarations into ``GraphFacts``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.fx as fx

from sparsify.graph.broadcast_values import BroadcastValues
from sparsify.graph.builder import GraphFacts, OpContext, Space, value_infos
from sparsify.graph.rules import find_rule
from sparsify.graph.trace import TensorInfo, TracedModel


def collect_facts(traced: TracedModel) -> GraphFacts:
    """Ask every node's op rule for its couplings; nodes without a rule become barriers."""
    facts = GraphFacts()
    gm = traced.graph_module
    parameter_spaces: list[tuple[Space, fx.Node]] = []
    deferred: set[str] = set()  # nodes whose rule left their couplings to a later node
    broadcasts = BroadcastValues(facts, gm.graph)
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            ctx = OpContext(traced, facts, node, "input")
            for key, info in value_infos(traced.values.get(node.name), node.name):
                for d in range(info.ndim):
                    ctx.fresh(ctx._space_of_key(key, d, info), f"model input '{node.name}'")
        elif node.op == "get_attr":
            ctx = OpContext(traced, facts, node, "parameter")
            info = traced.values.get(node.name)
            if isinstance(info, TensorInfo):
                module, _, name = str(node.target).rpartition(".")
                for d in range(info.ndim):
                    space = ctx.out(d)
                    ctx.member(space, module, name, d, "value")
                    if space:
                        ctx._define(space)
                        parameter_spaces.append((space, node))
        elif node.op == "output":
            ctx = OpContext(traced, facts, node, "output")
            for arg in _nodes_in(node.args):
                for key, info in value_infos(traced.values.get(arg.name), arg.name):
                    for d in range(info.ndim):
                        ctx.block(ctx._space_of_key(key, d, info), "model output")
        else:
            _apply_rule(traced, facts, node, deferred, broadcasts)
    _block_undeclared_parameter_dims(facts, parameter_spaces)
    for space in list(facts.widths):
        if space not in facts.defined:
            node_name = space[0].split(".")[0]
            rule = facts.rule_of.get(node_name, "?")
            facts.blocked.setdefault(space, []).append(
                f"op rule {rule!r} of node '{node_name}' did not declare dim {space[1]}"
            )
    return facts


def _apply_rule(traced: TracedModel, facts: GraphFacts, node: fx.Node, deferred: set[str],
                broadcasts: BroadcastValues) -> None:
    rule = find_rule(node, traced.graph_module)
    kind = rule.kind if rule else "none"
    facts.rule_of[node.name] = kind
    ctx = _FailClosedContext(traced, facts, node, kind, deferred)
    makes_tensor = bool(value_infos(traced.values.get(node.name), node.name))
    touches_tensor = makes_tensor or any(value_infos(traced.values.get(a.name), a.name) for a in node.all_input_nodes)
    if rule is None:
        if touches_tensor:
            if node.op == "call_module":
                cls = type(traced.graph_module.get_submodule(str(node.target))).__name__
                fix = f"sparsify.extend.register_module_type({cls}, rule=fn)"
            else:
                where = "methods=" if node.op == "call_method" else "functions="
                fix = f"sparsify.extend.register_op_rule(kind, fn, {where}...)"
            ctx.block_all(f"no op rule for {ctx.describe()}; its channels are not prunable. "
                          f"Fix: register one with {fix} (see docs/op_rules.md)")
        return
    before = _Declared.of(facts)
    mark = broadcasts.mark()
    try:
        rule.fn(ctx)
    except Exception as exc:  # a rule that cannot handle this call must fail closed
        reason = f"op rule {kind!r} failed on {ctx.describe()}: {type(exc).__name__}: {exc}"
        for space in before.undo_couplings(facts):
            ctx.block(space, reason)
        ctx.block_all(reason)
        return
    if not ctx.asked_for_spaces and makes_tensor:
        deferred.add(node.name)
    broadcasts.after_rule(ctx, mark)
    if makes_tensor and not node.users and not _in_place(ctx):
        # a value nothing uses still runs (its members are sliced), but torch.export keeps such a node where
        # Python reads its shape (CLIPSeg's position table: a size check that chooses a branch), so its
        # couplings do not count as a consumer declaring a parameter's dim a channel dim
        facts.layout_cache.setdefault(_DEAD, []).append((before, _Declared.of(facts)))


_DEAD = "__unused_value_couplings__"  # key in facts.layout_cache: [(_Declared before, after)] of unused values


def _in_place(ctx: OpContext) -> bool:
    """An in-place op (``x.mul_(g)``, ``operator.iadd``, ``aten.relu_``): used through its input, not its result."""
    name = ctx.op_name
    return name.endswith("_") or (ctx.node.op == "call_function" and name in ("iadd", "isub", "imul", "itruediv"))


class _FailClosedContext(OpContext):
    """The context rules get while facts are collected. Its ``block_all`` (a rule failing closed, an
    op without a rule, a rule that raised) blocks every channel space whose coupling to this node is
    unknown: the dims of the node's inputs and outputs, and upstream of them, through every node whose
    rule *deferred* its couplings to this one, the values of those nodes and of the first node that
    declared its own. A rule defers when it returns without asking for a single channel space: the
    interior of a layout chain (view → transpose → … ) is analysed as one function by the chain's
    exit, so if the exit fails, nothing ties the chain's input (the projection that produces the
    channels) to anything blocked, and that projection would stay a prunable group whose slice
    offsets and head sizes pruning then breaks. Blocking the whole connected component would not reach
    it: the missing couplings are exactly the ones that would have connected it."""

    def __init__(self, traced: TracedModel, facts: GraphFacts, node: fx.Node, rule_kind: str,
                 deferred: set[str]) -> None:
        super().__init__(traced, facts, node, rule_kind)
        self.deferred = deferred
        self.asked_for_spaces = False

    def space(self, arg: Any, dim: int, element: int | tuple[int, ...] | None = None) -> Space | None:
        self.asked_for_spaces = True
        return super().space(arg, dim, element)

    def _space_of_key(self, key: str, d: int, info: TensorInfo) -> Space | None:
        self.asked_for_spaces = True
        return super()._space_of_key(key, d, info)

    def block_all(self, reason: str) -> None:
        super().block_all(reason)
        stack = [a for a in self.node.all_input_nodes if a.name in self.deferred]
        seen: set[str] = set()
        while stack:
            node = stack.pop()
            if node.name in seen:
                continue
            seen.add(node.name)
            why = f"{reason} (upstream, through '{node.name}', whose channel mapping that op would have declared)"
            for n in (node, *node.all_input_nodes):
                self._block_value(n, why)
            stack.extend(a for a in node.all_input_nodes if a.name in self.deferred)

    def _block_value(self, node: fx.Node, reason: str) -> None:
        for key, info in value_infos(self.traced.values.get(node.name), node.name):
            for d in range(info.ndim):
                self.block(self._space_of_key(key, d, info), reason)


@dataclass(frozen=True)
class _Declared:
    """How many couplings had been declared before a rule ran."""

    same: int
    pairs: int
    merges: int

    @classmethod
    def of(cls, facts: GraphFacts) -> _Declared:
        return cls(len(facts.same), len(facts.pairs), len(facts.merges))

    def undo_couplings(self, facts: GraphFacts) -> set[Space]:
        """Drop the couplings declared since; a rule that raised may have declared them half-way (or
        from garbage). Returns the spaces they touched, which become barriers with the rule's inputs."""
        touched = {s for pair in facts.same[self.same:] for s in pair}
        touched |= {s for a, b, _, _ in facts.pairs[self.pairs:] for s in (a, b)}
        touched |= {s for m in facts.merges[self.merges:] for s in (m.out, *m.factors)}
        del facts.same[self.same:], facts.pairs[self.pairs:], facts.merges[self.merges:]
        return touched


def _block_undeclared_parameter_dims(facts: GraphFacts, parameter_spaces: list[tuple[Space, fx.Node]]) -> None:
    """A dim of a parameter read by ``get_attr`` is a channel dim only if a consumer's rule couples it
    (``same``/``pairs``/``merge``, or a member on the consumer's space such as F.conv2d's weight dim
    0). Others, like a kernel's spatial dims, are barriers rather than prunable on their own."""
    dead = facts.layout_cache.get(_DEAD, [])
    same = [p for k, p in enumerate(facts.same) if not any(a.same <= k < b.same for a, b in dead)]
    pairs = [p for k, p in enumerate(facts.pairs) if not any(a.pairs <= k < b.pairs for a, b in dead)]
    merges = [m for k, m in enumerate(facts.merges) if not any(a.merges <= k < b.merges for a, b in dead)]
    coupled = {s for pair in same for s in pair}
    coupled |= {s for a, b, _, _ in pairs for s in (a, b)}
    coupled |= {s for m in merges for s in (m.out, *m.factors)}
    own = {space for space, _ in parameter_spaces}
    tensor_of = {m.space: m.tensor for m in facts.members if m.space in own}
    declared = {(m.tensor, m.dim) for m in facts.members if m.space not in own}
    for space, node in parameter_spaces:
        if space not in coupled and (tensor_of.get(space), space[1]) not in declared:
            users = ", ".join(f"'{u.name}'" for u in node.users)
            facts.blocked.setdefault(space, []).append(
                f"parameter '{node.target}' dim {space[1]} is read by {users}, whose op rule does not "
                "declare it as a channel dim")


def _nodes_in(args: object) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg(args, found.append)
    return found
