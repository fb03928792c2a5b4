"""Fuse conv + bias + ReLU (and + residual add) into one cuDNN kernel, for deployed models run eagerly on CUDA.

This pass inserts :class:`sparsify.nn.ConvReLU` and :class:`sparsify.nn.ConvAddReLU` (one cuDNN kernel for
``relu(conv(x) + b)`` and ``relu(conv(x) + z + b)`` on CUDA, the original math anywhere else; see
:mod:`sparsify.nn.fused`).

Patterns are found on the traced graph (``sparsify.graph.trace``) and fused only when that is exact for every
use: ``conv → [Identity …] → act`` and ``conv → [Identity …] → add(·, z) → act``, where ``act`` is a ReLU or
ReLU6 / ``Hardtanh(0, m)`` (module, function or method; a ReLU6 is a ReLU then ``clamp_max_``) and the
Identities are folded BatchNorms. The conv is a plain ``nn.Conv2d`` with zero padding that cuDNN can express
(not ``padding='same'`` with an even kernel), called once, registered once, without hooks, its tensors not
read elsewhere; every value between the conv and the activation has one user; ``z`` has the conv output's
shape (no broadcasting) and is not the tensor an in-place add writes to.

A residual add's other operand is often a conv too (ResNet's downsample: conv → folded BN); deployed alone, its
bias is a separate elementwise kernel over the whole output (4 kernels, ~1.1 of ResNet-50's 7.8 ms at batch
256 bf16 on an H200). ``merge_residual_bias`` (default) moves that bias into the fused conv's (``relu(conv(x)
+ (b + b_z) + conv_z(x'))``, exact up to rounding): ``Fusion.bias_from`` names the conv whose bias moved.

How the fused modules are installed: when every fusion is ``conv → act module`` with the activation module
called once (``nn.Sequential`` chains such as MobileNetV2), in place (the conv becomes ``ConvReLU(conv)``, the
activation ``nn.Identity``) and the model keeps its class. Otherwise (a residual add, a ReLU module called
several times, a functional ReLU: torchvision's ResNets) the result is a ``torch.fx.GraphModule`` of the
rewritten graph that shares the model's parameters; its forward is the eval-mode trace.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from sparsify._utils import set_submodule
from sparsify.deploy.redundant import drop_repeated_activations
from sparsify.graph.fusable import FusionMatch, bias_source, find_fusions, module_usage
from sparsify.graph.trace import trace
from sparsify.nn.fused import ConvAddReLU, ConvReLU

__all__ = ["Fusion", "find_conv_activations", "fuse_conv_activations"]


@dataclass(frozen=True)
class Fusion:
    """One fused pattern: the conv's module name (the fused module takes its place), the activation (its
    module name, or its node's name in the traced graph for a function), the add node's name for a
    ``ConvAddReLU``, the activation's cap (None: a plain ReLU) and the conv whose bias was merged into it."""

    conv: str
    activation: str
    add: str | None = None
    max_value: float | None = None
    bias_from: str | None = None  # merge_residual_bias: the conv computing z, whose bias the fused conv took


def _fusion(match: FusionMatch) -> Fusion:
    return Fusion(match.conv, match.activation, match.add, match.max_value)


def _merge_bias(gm: fx.GraphModule, conv: nn.Conv2d, source: str) -> nn.Conv2d:
    """``conv`` with ``source``'s bias added to its own; ``source`` replaced in ``gm`` by a bias-free conv (both
    new modules sharing the weights)."""
    z_conv = gm.get_submodule(source)
    bias_free, merged = copy.copy(z_conv), copy.copy(conv)
    bias_free._parameters = dict(z_conv._parameters, bias=None)
    own = conv.bias if conv.bias is not None else torch.zeros_like(z_conv.bias)
    merged._parameters = dict(conv._parameters, bias=nn.Parameter(own.detach() + z_conv.bias.detach(),
                                                                  requires_grad=conv.weight.requires_grad))
    set_submodule(gm, source, bias_free)
    return merged


def find_conv_activations(model: nn.Module, example_inputs: Any) -> tuple[list[Fusion], dict[str, str]]:
    """Conv→activation patterns of ``model`` that can be fused exactly, and for other convs followed by
    an activation, why not: ``([Fusion, ...], {conv name: reason})``."""
    matches, refused = find_fusions(trace(model, example_inputs))
    return [_fusion(m) for m in matches], refused


def fuse_conv_activations(model: nn.Module, example_inputs: Any, *, merge_residual_bias: bool = True
                          ) -> tuple[nn.Module, list[Fusion]]:
    """Fuse every exactly fusable conv→(add)→ReLU of an eval-mode ``model``; returns ``(module, fusions)``.

    ``module`` is ``model`` itself (modules replaced in place) when every fusion is a conv followed by an
    activation module called once, else a ``torch.fx.GraphModule`` sharing ``model``'s parameters (``model``
    is then left as it was; with ``merge_residual_bias`` the two convs of a merged bias get new modules that
    share the weights and hold the moved bias). Without fusions, ``model`` is returned unchanged.
    """
    if not any(isinstance(m, nn.Conv2d) for m in model.modules()):
        return model, []  # e.g. a transformer: no trace needed
    traced = trace(model, example_inputs)
    matches, _ = find_fusions(traced)
    gm = traced.graph_module
    if not matches:
        return model, []
    calls, read, names_of = module_usage(traced)

    def replaceable(match: FusionMatch) -> bool:
        act = match.nodes[-1]
        return match.add is None and act.op == "call_module" and calls[str(act.target)] == 1 and \
            names_of[id(gm.get_submodule(str(act.target)))] == 1

    if all(map(replaceable, matches)):
        for match in matches:
            conv = model.get_submodule(match.conv)
            set_submodule(model, match.conv, ConvReLU(conv, match.max_value))
            set_submodule(model, str(match.nodes[-1].target), nn.Identity())
        return model, [_fusion(m) for m in matches]

    graph, fusions = gm.graph, []
    for match in matches:
        conv_node, act = match.nodes[0], match.nodes[-1]
        conv = gm.get_submodule(match.conv)
        args: tuple[Any, ...] = (conv_node.args[0],)
        fusion = _fusion(match)
        if match.add is not None:
            add, src = match.nodes[-2], match.nodes[-3]
            z = add.args[1] if add.args[0] is src else add.args[0]
            args = (*args, z)  # read now: an earlier fusion may have replaced z's node
            source = bias_source(traced, z, (calls, read, names_of)) if merge_residual_bias else None
            if source is not None:
                conv, fusion = _merge_bias(gm, conv, source), replace(fusion, bias_from=source)
            fused: nn.Module = ConvAddReLU(conv, fusion.max_value)
        else:
            fused = ConvReLU(conv, fusion.max_value)
        fusions.append(fusion)
        set_submodule(gm, match.conv, fused)  # gm's own module tree: model's stays as it was
        with graph.inserting_before(act):
            new = graph.call_module(match.conv, args)
        act.replace_all_uses_with(new)
        for node in reversed(match.nodes):
            graph.erase_node(node)
    graph.lint()
    gm.recompile()
    drop_repeated_activations(gm)  # a ReLU of a fused ReLU's output (left by depth pruning): one kernel less
    gm.eval()  # its fresh containers start in training mode; the traced forward is the eval-mode one
    return gm, fusions
