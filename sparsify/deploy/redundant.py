"""Drop activations that cannot change their input: a ReLU of a ReLU's output, a ReLU6 of a ReLU6's.

Depth pruning leaves such pairs (a torchvision ``Bottleneck`` without its branch is its ReLU, applied to the
previous block's fused conv+add+ReLU output); deployed eagerly each is one more elementwise kernel over the
whole activation. ``act(y)`` is dropped when ``y`` is the output of a ReLU-like activation (module, function,
method, or a fused :class:`sparsify.nn.ConvReLU` / :class:`sparsify.nn.ConvAddReLU`) whose range ``[0, c]`` it
leaves unchanged: a ReLU always, ``hardtanh(·, 0, m)`` when ``c ≤ m``. Exact.
"""

from __future__ import annotations

import math

import torch.fx as fx

from sparsify.graph.fusable import relu_activation
from sparsify.nn.fused import ConvAddReLU, ConvReLU

__all__ = ["drop_repeated_activations"]


def _range_cap(node: fx.Node, gm: fx.GraphModule) -> float | None:
    """The cap c of a value known to lie in [0, c] (inf: no cap), or None when its sign is not known."""
    if node.op == "call_module" and isinstance(gm.get_submodule(str(node.target)), (ConvReLU, ConvAddReLU)):
        cap = gm.get_submodule(str(node.target)).max_value
        return math.inf if cap is None else float(cap)
    if node.args and isinstance(node.args[0], fx.Node):
        is_act, cap = relu_activation(node, gm, node.args[0])
        if is_act:
            return math.inf if cap is None else cap
    return None


def drop_repeated_activations(gm: fx.GraphModule) -> list[str]:
    """Remove, in place, every activation of ``gm`` that leaves its input unchanged; returns their node names."""
    dropped = []
    for node in list(gm.graph.nodes):
        if not node.args or not isinstance(node.args[0], fx.Node):
            continue
        src = node.args[0]
        is_act, cap = relu_activation(node, gm, src)
        if not is_act:
            continue
        below = _range_cap(src, gm)
        if below is None or (cap is not None and below > cap):
            continue
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)
        dropped.append(node.name)
    if dropped:
        gm.graph.lint()
        gm.delete_all_unused_submodules()
        gm.recompile()
    return dropped
