"""What deployment does after each conv, read from the training trace (the context a layer is timed in).

``sparsify.deploy`` folds a BatchNorm that alone follows a conv into its bias, fuses a following ReLU(6) into
the conv (conv+bias+ReLU, one cuDNN kernel), fuses a residual add then a ReLU(6) into the first conv of the sum
(conv+bias+add+ReLU), and moves the bias of the conv computing the added tensor into that fused conv (no bias
kernel of its own). :func:`deployed_epilogues` runs deployment's own finders (:mod:`sparsify.graph.fusable`)
on the unfolded graph, with the BatchNorms that will fold as the transparent nodes, so
:class:`~sparsify.measure.LatencyModel` times each layer as it will run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx
from torch import nn

from sparsify.graph.fusable import bias_source, find_fusions, foldable_bn_pairs, module_usage, relu_activation
from sparsify.graph.trace import TracedModel

__all__ = ["Epilogue", "deployed_epilogues"]


@dataclass(frozen=True)
class Epilogue:
    """After one conv, deployed: ``folded_bn`` (a BN alone follows: folded into a bias), ``relu`` (a ReLU follows:
    fused, or for a grouped conv run after it), ``add_relu`` (an add then a ReLU follow: fused, this conv takes
    them), ``bias_merged`` (its output is only the added tensor of another conv's fused add: its bias moves
    there), ``relu_cap`` (the activation's cap: ReLU6 is 6.0)."""

    folded_bn: bool = False
    relu: bool = False
    add_relu: bool = False
    bias_merged: bool = False
    relu_cap: float | None = None


def _direct_activation(gm: fx.GraphModule, node: fx.Node, transparent: set[str]) -> tuple[bool, float | None]:
    """Whether a ReLU(6) alone follows ``node`` (through the BN that folds), and its cap."""
    end = node
    while len(end.users) == 1:
        user = next(iter(end.users))
        if user.op != "call_module" or (str(user.target) not in transparent and
                                        type(gm.get_submodule(str(user.target))) is not nn.Identity):
            break
        end = user
    users = list(end.users)
    return relu_activation(users[0], gm, end) if len(users) == 1 else (False, None)


def deployed_epilogues(traced: TracedModel) -> dict[fx.Node, Epilogue]:
    """The :class:`Epilogue` of every conv module call of the trace that deployment folds or fuses (functional
    convs: none, deployment leaves them as they are)."""
    gm = traced.graph_module
    usage = module_usage(traced)
    pairs, _ = foldable_bn_pairs(traced, usage)
    folded, folding = {c for c, _ in pairs}, {b for _, b in pairs}

    def transparent(node: fx.Node, module: nn.Module) -> bool:
        return type(module) is nn.Identity or str(node.target) in folding

    matches, refused = find_fusions(traced, transparent, usage)
    fused = {m.conv: m for m in matches}
    merged = {bias_source(traced, m.z, usage, transparent, lambda name, conv: conv.bias is not None or name in folded)
              for m in matches if m.add is not None and m.z is not None} - {None}
    out: dict[fx.Node, Epilogue] = {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(gm.get_submodule(str(node.target)), nn.modules.conv._ConvNd):
            continue
        name, match = str(node.target), fused.get(str(node.target))
        relu, cap = (match.add is None, match.max_value) if match is not None else (False, None)
        if match is None and "grouped conv" in refused.get(name, ""):  # deployed unfused: conv, then the ReLU
            relu, cap = _direct_activation(gm, node, folding)
        out[node] = Epilogue(folded_bn=name in folded, relu=relu, add_relu=match is not None and match.add is not None,
                             bias_merged=name in merged, relu_cap=cap if relu or match is not None else None)
    return out
