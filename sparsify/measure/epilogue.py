"""What deployment does after each conv, read from the training trace (the context a layer is timed in).

``sparsify.deploy`` folds a BatchNorm that alone follows a conv into its bias, fuses a following ReLU into the
conv (conv+bias+ReLU, one cuDNN kernel), fuses a residual add then a ReLU into the first conv of the sum
(conv+bias+add+ReLU), and moves the bias of the conv computing the added tensor into that fused conv (no bias
kernel of its own). :func:`deployed_epilogues` finds the same patterns on the unfolded graph (conv → [BN] →
ReLU, conv → [BN] → add(·, z) → ReLU), so :class:`~sparsify.measure.LatencyModel` times each layer as it
will run. The rules mirror :mod:`sparsify.deploy.fusion` (tests compare the two on torchvision's ResNets).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch.fx as fx
from torch import nn

__all__ = ["Epilogue", "deployed_epilogues"]

_ADDS = {"add", "add_", "iadd"}


@dataclass(frozen=True)
class Epilogue:
    """After one conv, deployed: ``folded_bn`` (a BN alone follows: folded into a bias), ``relu`` (a ReLU follows:
    fused), ``add_relu`` (an add then a ReLU follow: fused, this conv takes them), ``bias_merged`` (its output is
    only the added tensor of another conv's fused add: its bias moves there)."""

    folded_bn: bool = False
    relu: bool = False
    add_relu: bool = False
    bias_merged: bool = False


def op_name(gm: fx.GraphModule, node: fx.Node) -> str:
    """What a node computes, by name: a module's class, a function's or a method's name (lower case)."""
    if node.op == "call_module":
        return type(gm.get_submodule(str(node.target))).__name__.lower()
    if node.op in ("call_function", "call_method"):
        return str(getattr(node.target, "__name__", node.target)).lower()
    return ""


def _is_relu(gm: fx.GraphModule, node: fx.Node) -> bool:
    return op_name(gm, node).split(".")[0] in ("relu", "relu_")


def _through_bn(gm: fx.GraphModule, node: fx.Node) -> tuple[bool, fx.Node]:
    """(a BatchNorm alone follows ``node``, the value after it: the BN's output, or ``node`` itself)."""
    users = list(node.users)
    if not (len(users) == 1 and "batchnorm" in op_name(gm, users[0]).replace("_", "")):
        return False, node
    end = users[0]
    after = list(end.users)
    if len(after) == 1 and op_name(gm, after[0]) == "getitem":  # ATen batch norm returns a tuple
        end = after[0]
    return True, end


def _fused_add(gm: fx.GraphModule, end: fx.Node, values: Mapping[str, Any]) -> tuple[fx.Node, fx.Node] | None:
    """(the ReLU, the added tensor z) when ``end`` alone feeds ``add(end, z) → ReLU`` as deployment fuses it."""
    users = list(end.users)
    if len(users) != 1:
        return None
    add = users[0]
    if add.op == "call_module" or op_name(gm, add) not in _ADDS or len(add.args) != 2 or add.kwargs \
            or end not in add.args:
        return None
    z = add.args[1] if add.args[0] is end else add.args[0]
    shapes = [getattr(values.get(n.name), "shape", None) if isinstance(n, fx.Node) else None for n in (z, end)]
    if shapes[0] is None or shapes[0] != shapes[1]:  # a broadcast add is not fused
        return None
    in_place = op_name(gm, add) in ("add_", "iadd") or add.op == "call_method"
    if add.args[0] is not end and in_place:  # z += conv(x) writes to z: deployment leaves it unfused
        return None
    acts = list(add.users)
    return (acts[0], z) if len(acts) == 1 and _is_relu(gm, acts[0]) else None


def _bias_source(gm: fx.GraphModule, z: fx.Node) -> fx.Node | None:
    """The plain nn.Conv2d node computing ``z`` alone (through its BN), whose bias deployment merges."""
    node = z
    if op_name(gm, node) == "getitem" and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    if "batchnorm" in op_name(gm, node).replace("_", "") and isinstance(node.args[0], fx.Node):
        if len(node.users) != 1:
            return None
        node = node.args[0]
    if node.op != "call_module" or len(node.users) != 1:
        return None
    m = gm.get_submodule(str(node.target))
    return node if isinstance(m, nn.Conv2d) and type(m).forward is nn.Conv2d.forward else None


def deployed_epilogues(gm: fx.GraphModule, values: Mapping[str, Any], convs: list[fx.Node]
                       ) -> dict[fx.Node, Epilogue]:
    """The :class:`Epilogue` of every node in ``convs`` (conv calls, in graph order); ``values``: the trace's
    recorded shapes by node name."""
    found: dict[fx.Node, dict[str, bool]] = {}
    claimed: set[fx.Node] = set()  # a residual add's ReLU is fused with the first of its convs
    merged: set[fx.Node] = set()
    for node in convs:
        folded_bn, end = _through_bn(gm, node)
        users = list(end.users)
        relu = len(users) == 1 and _is_relu(gm, users[0])
        fused = None if relu else _fused_add(gm, end, values)
        add_relu = fused is not None and fused[0] not in claimed
        if add_relu:
            claimed.add(fused[0])
            source = _bias_source(gm, fused[1])
            if source is not None:
                merged.add(source)
        found[node] = {"folded_bn": folded_bn, "relu": relu, "add_relu": add_relu}
    return {node: Epilogue(**flags, bias_merged=node in merged) for node, flags in found.items()}
