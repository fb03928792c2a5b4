"""Which tensors of a group a structure's soft factor scales.

Every producing tensor (conv/linear rows, biases, norm γ and β) — except a conv/linear whose output
goes straight into a BatchNorm of the same group. There the BatchNorm's γ and β carry the factor: in
training BatchNorm divides a scale of the weight rows out, so scaling them too changes nothing, while
baking it in at prune time leaves rows shrunk by the factor f, whose effective learning rate under the
BatchNorm is 1/f² larger (an STR-filter ResNet-56 on CIFAR-10 went from loss 0.05 to 1.67 in the first
fine-tuning epoch). The soft model stays exact to prune: a zero factor zeroes γ and β, so the channel
is 0 after the BatchNorm, as before.
"""

from __future__ import annotations

import numpy as np
from torch import fx, nn

from sparsify.graph.channel_graph import ChannelGraph, ChannelGroup, Member

SCALED_ROLES = ("out", "value", "scale", "bias")


def _single_call(graph: fx.Graph, target: str) -> fx.Node | None:
    calls = [n for n in graph.nodes if n.op == "call_module" and n.target == target]
    return calls[0] if len(calls) == 1 else None


def normalized_producers(cg: ChannelGraph, group: ChannelGroup) -> set[str]:
    """Modules of ``group`` whose produced channels feed only an affine BatchNorm of the group, index for
    index (the same structure of every channel)."""
    graph = cg.traced.graph
    out_members = {m.module: m for m in group.members if m.role == "out"}
    found: set[str] = set()
    for bn_member in group.members:
        if bn_member.role != "scale":
            continue
        bn = cg.model.get_submodule(bn_member.module)
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or not bn.affine:
            continue
        bn_node = _single_call(graph, bn_member.module)
        if bn_node is None or not bn_node.args or not isinstance(bn_node.args[0], fx.Node):
            continue
        producer = bn_node.args[0]
        member = out_members.get(str(producer.target)) if producer.op == "call_module" else None
        if (member is None or len(producer.users) != 1 or _single_call(graph, str(producer.target)) is None
                or not np.array_equal(member.structure_of, bn_member.structure_of)):
            continue
        found.add(member.module)
    return found


def scaled_members(cg: ChannelGraph, group: ChannelGroup) -> list[Member]:
    """The members a soft factor of ``group``'s structures is applied to (see the module docstring)."""
    skip = normalized_producers(cg, group)
    return [m for m in group.members if m.role in SCALED_ROLES
            and not (m.module in skip and m.role in ("out", "bias"))]
