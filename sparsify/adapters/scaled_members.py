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

from collections import defaultdict

import numpy as np
from torch import fx, nn

from sparsify.graph.channel_graph import ChannelGraph, ChannelGroup, Member

SCALED_ROLES = ("out", "value", "scale", "bias")


def _module_calls(graph: fx.Graph) -> dict[str, list[fx.Node]]:
    calls: dict[str, list[fx.Node]] = defaultdict(list)
    for n in graph.nodes:
        if n.op == "call_module":
            calls[str(n.target)].append(n)
    return calls


def normalized_producers(cg: ChannelGraph, group: ChannelGroup) -> set[str]:
    """Modules of ``group`` whose produced channels feed only an affine BatchNorm of the group, index for
    index (the same structure of every channel); each module called once."""
    norms = [m for m in group.members if m.role == "scale"
             and isinstance(bn := cg.model.get_submodule(m.module), nn.modules.batchnorm._BatchNorm) and bn.affine]
    if not norms:
        return set()
    calls = _module_calls(cg.traced.graph)
    out_members = {m.module: m for m in group.members if m.role == "out"}
    found: set[str] = set()
    for bn_member in norms:
        bn_calls = calls.get(bn_member.module, [])
        if len(bn_calls) != 1 or not bn_calls[0].args or not isinstance(bn_calls[0].args[0], fx.Node):
            continue
        producer = bn_calls[0].args[0]
        member = out_members.get(str(producer.target)) if producer.op == "call_module" else None
        if (member is not None and len(producer.users) == 1 and len(calls[member.module]) == 1
                and np.array_equal(member.structure_of, bn_member.structure_of)):
            found.add(member.module)
    return found


def scaled_members(cg: ChannelGraph, group: ChannelGroup) -> list[Member]:
    """The members a soft factor of ``group``'s structures is applied to (see the module docstring)."""
    skip = normalized_producers(cg, group)
    return [m for m in group.members if m.role in SCALED_ROLES
            and not (m.module in skip and m.role in ("out", "bias"))]
