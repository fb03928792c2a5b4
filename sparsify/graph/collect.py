"""Run the op rules over a traced graph and collect their declarations into ``GraphFacts``."""

from __future__ import annotations

import torch.fx as fx

from sparsify.graph.builder import GraphFacts, OpContext, Space, value_infos
from sparsify.graph.rules import find_rule
from sparsify.graph.trace import TensorInfo, TracedModel


def collect_facts(traced: TracedModel) -> GraphFacts:
    """Ask every node's op rule for its couplings; nodes without a rule become barriers."""
    facts = GraphFacts()
    gm = traced.graph_module
    parameter_spaces: list[tuple[Space, fx.Node]] = []
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
            _apply_rule(traced, facts, node)
    _block_undeclared_parameter_dims(facts, parameter_spaces)
    for space in list(facts.widths):
        if space not in facts.defined:
            node_name = space[0].split(".")[0]
            rule = facts.rule_of.get(node_name, "?")
            facts.blocked.setdefault(space, []).append(
                f"op rule {rule!r} of node '{node_name}' did not declare dim {space[1]}"
            )
    return facts


def _apply_rule(traced: TracedModel, facts: GraphFacts, node: fx.Node) -> None:
    rule = find_rule(node, traced.graph_module)
    kind = rule.kind if rule else "none"
    facts.rule_of[node.name] = kind
    ctx = OpContext(traced, facts, node, kind)
    touches_tensor = bool(value_infos(traced.values.get(node.name), node.name)) or any(
        value_infos(traced.values.get(a.name), a.name) for a in node.all_input_nodes
    )
    if rule is None:
        if touches_tensor:
            ctx.block_all(
                f"no op rule for {ctx.describe()}; its channels are not prunable. "
                "Fix: register one with sparsify.extend.register_op_rule(...) (see docs/op_rules.md)"
            )
        return
    try:
        rule.fn(ctx)
    except Exception as exc:  # a rule that cannot handle this call must fail closed
        ctx.block_all(f"op rule {kind!r} failed on {ctx.describe()}: {type(exc).__name__}: {exc}")


def _block_undeclared_parameter_dims(facts: GraphFacts, parameter_spaces: list[tuple[Space, fx.Node]]) -> None:
    """A dim of a parameter read by ``get_attr`` is a channel dim only if a consumer's rule couples it
    (``same``/``pairs``/``merge``, or a member on the consumer's space such as F.conv2d's weight dim
    0). Others, like a kernel's spatial dims, are barriers rather than prunable on their own."""
    coupled = {s for pair in facts.same for s in pair}
    coupled |= {s for a, b, _, _ in facts.pairs for s in (a, b)}
    coupled |= {s for m in facts.merges for s in (m.out, *m.factors)}
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
