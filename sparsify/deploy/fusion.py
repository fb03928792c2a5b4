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
import operator
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from sparsify._utils import set_submodule
from sparsify.graph.trace import TensorInfo, TracedModel, trace
from sparsify.nn.fused import ConvAddReLU, ConvReLU, cudnn_padding

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


@dataclass
class _Match:
    fusion: Fusion
    nodes: list[fx.Node]  # conv, Identities, [add], activation: in graph order


_RELU_FUNCTIONS = (F.relu, torch.relu, torch.relu_, F.relu_)
_ADDS = (operator.add, operator.iadd, torch.add)


def _activation_cap(node: fx.Node, gm: fx.GraphModule, src: fx.Node) -> tuple[bool, float | None]:
    """Whether ``node`` is a ReLU-like activation of ``src`` alone, and its cap (None for a ReLU)."""
    if not node.args or node.args[0] is not src:
        return False, None
    if node.op == "call_module":
        m = gm.get_submodule(str(node.target))
        if len(node.args) != 1 or node.kwargs:
            return False, None
        if type(m) is nn.ReLU:
            return True, None
        if type(m) in (nn.ReLU6, nn.Hardtanh) and m.min_val == 0 and m.max_val > 0:
            return True, float(m.max_val)
        return False, None
    if node.op == "call_method":
        return (node.target in ("relu", "relu_") and len(node.args) == 1 and not node.kwargs), None
    if node.op != "call_function":
        return False, None
    extra = [*node.args[1:], *node.kwargs.values()]
    if node.target in _RELU_FUNCTIONS:
        return all(isinstance(a, bool) for a in extra) and set(node.kwargs) <= {"inplace"}, None
    if node.target is F.relu6:
        return all(isinstance(a, bool) for a in extra) and set(node.kwargs) <= {"inplace"}, 6.0
    if node.target is F.hardtanh and set(node.kwargs) <= {"min_val", "max_val", "inplace"}:
        values = dict(zip(("min_val", "max_val", "inplace"), node.args[1:], strict=False)) | dict(node.kwargs)
        lo, hi = values.get("min_val", -1.0), values.get("max_val", 1.0)
        if isinstance(lo, (int, float)) and isinstance(hi, (int, float)) and lo == 0 and hi > 0:
            return True, float(hi)
    return False, None


def _added(node: fx.Node, src: fx.Node) -> fx.Node | None:
    """The other operand when ``node`` is ``src + z`` (no alpha, z a graph value, src not written by z)."""
    is_add = (node.op == "call_function" and node.target in _ADDS) or (
        node.op == "call_method" and node.target in ("add", "add_"))
    if not is_add or len(node.args) != 2 or node.kwargs or src not in node.args:
        return None
    inplace = node.target is operator.iadd or node.target == "add_"
    if node.args[0] is not src and (inplace or node.op == "call_method"):
        return None  # z += conv(x) writes to z, z.add(conv(x)) is a method of z: leave both
    z = node.args[1] if node.args[0] is src else node.args[0]
    return z if isinstance(z, fx.Node) and z is not src else None


def _hooked(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks)


def module_usage(traced: TracedModel) -> tuple[dict[str, int], set[str], dict[int, int]]:
    """Calls per module name, module names whose tensors a get_attr reads, names per module object (by id):
    what decides whether rewriting a module changes only the call being rewritten."""
    calls: dict[str, int] = {}
    read: set[str] = set()
    for node in traced.graph.nodes:
        if node.op == "call_module":
            calls[str(node.target)] = calls.get(str(node.target), 0) + 1
        elif node.op == "get_attr":
            read.add(str(node.target).rpartition(".")[0])
    names_of: dict[int, int] = {}
    for _, m in traced.model.named_modules(remove_duplicate=False):
        names_of[id(m)] = names_of.get(id(m), 0) + 1
    return calls, read, names_of


def _find(traced: TracedModel) -> tuple[list[_Match], dict[str, str]]:
    gm = traced.graph_module
    calls, read, names_of = module_usage(traced)
    matches, refused, claimed = [], {}, set()
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        conv = gm.get_submodule(str(node.target))
        if not isinstance(conv, nn.Conv2d) or type(conv).forward is not nn.Conv2d.forward:
            continue
        name = str(node.target)
        chain, end, why = [node], node, ""
        while len(end.users) == 1:  # skip Identities (folded BatchNorms)
            user = next(iter(end.users))
            if user.op != "call_module" or type(gm.get_submodule(str(user.target))) is not nn.Identity:
                break
            if len(user.args) != 1 or user.kwargs or _hooked(gm.get_submodule(str(user.target))):
                break
            chain.append(user)
            end = user
        users = list(end.users)
        acts = [u for u in users if _activation_cap(u, gm, end)[0]]
        add = z = None
        if len(users) == 1 and not acts:
            z = _added(users[0], end)
            if z is not None:
                add = users[0]
                acts = [u for u in add.users if _activation_cap(u, gm, add)[0]]
                if len(add.users) != 1 and acts:
                    why = "the sum is also used outside the activation"
        if not acts or acts[0] in claimed:  # a residual add's activation is fused with one of its convs
            continue
        act = acts[0]
        _, cap = _activation_cap(act, gm, add if add is not None else end)
        leaf = next((t for t in calls if name.startswith(t + ".")), None)
        if not why:
            if leaf is not None:
                why = f"'{name}' lives inside the module '{leaf}', which is called as a whole"
            elif len(users) != 1:
                why = f"the output of '{name}' is also used outside the activation"
            elif len(node.args) != 1 or node.kwargs:
                why = f"'{name}' is called with extra arguments"
            elif conv.groups != 1:  # H100, MobileNetV2's 17 depthwise convs: 29.7 ms fused, ~1.5 ms unfused
                why = f"'{name}' is a grouped conv (cuDNN's fused kernel for grouped/depthwise convs is slow)"
            elif cudnn_padding(conv) is None:
                why = (f"'{name}' pads with '{conv.padding_mode}'" if conv.padding_mode != "zeros" else f"'{name}' "
                       "has padding='same' with an even kernel (asymmetric padding; cuDNN pads symmetrically)")
            elif calls[name] != 1 or names_of[id(conv)] != 1:
                why = f"'{name}' is used more than once"
            elif name in read:
                why = f"the tensors of '{name}' are read elsewhere in the graph"
            elif _hooked(conv) or (act.op == "call_module" and _hooked(gm.get_submodule(str(act.target)))):
                why = "forward hooks are registered on the conv or the activation"
            elif add is not None and not _same_shape(traced, z, add, node):
                why = "the added tensor's shape differs from the conv output's (broadcasting)"
        if why:
            refused[name] = why
            continue
        nodes = [*chain, *([add] if add is not None else []), act]
        claimed.add(act)
        act_name = str(act.target) if act.op == "call_module" else act.name
        matches.append(_Match(Fusion(name, act_name, None if add is None else add.name, cap), nodes))
    return matches, refused


def _bias_source(traced: TracedModel, z: fx.Node, calls: dict[str, int], read: set[str],
                 names_of: dict[int, int]) -> str | None:
    """The conv computing ``z`` alone (through Identities, every value used once) whose bias can move into the
    fused conv, or None."""
    gm, node = traced.graph_module, z
    while node.op == "call_module" and type(gm.get_submodule(str(node.target))) is nn.Identity:
        if len(node.users) != 1 or len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], fx.Node):
            return None
        node = node.args[0]
    if node.op != "call_module" or len(node.users) != 1:
        return None
    name = str(node.target)
    conv = gm.get_submodule(name)
    plain = isinstance(conv, nn.Conv2d) and type(conv).forward is nn.Conv2d.forward and conv.bias is not None
    if not plain or calls.get(name) != 1 or names_of.get(id(conv)) != 1 or name in read or _hooked(conv):
        return None
    if any(name.startswith(t + ".") for t in calls):  # inside a module called as a whole
        return None
    return name


def _same_shape(traced: TracedModel, z: Any, add: fx.Node, conv: fx.Node) -> bool:
    infos = [traced.values.get(n.name) for n in (z, add, conv)]
    return all(isinstance(i, TensorInfo) for i in infos) and infos[0].shape == infos[1].shape == infos[2].shape \
        and infos[0].dtype == infos[2].dtype


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
    matches, refused = _find(trace(model, example_inputs))
    return [m.fusion for m in matches], refused


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
    matches, _ = _find(traced)
    gm = traced.graph_module
    if not matches:
        return model, []
    calls, read, names_of = module_usage(traced)

    def replaceable(match: _Match) -> bool:
        act = match.nodes[-1]
        return match.fusion.add is None and act.op == "call_module" and calls[str(act.target)] == 1 and \
            names_of[id(gm.get_submodule(str(act.target)))] == 1

    if all(map(replaceable, matches)):
        for match in matches:
            conv = model.get_submodule(match.fusion.conv)
            set_submodule(model, match.fusion.conv, ConvReLU(conv, match.fusion.max_value))
            set_submodule(model, str(match.nodes[-1].target), nn.Identity())
        return model, [m.fusion for m in matches]

    graph, fusions = gm.graph, []
    for match in matches:
        conv_node, act = match.nodes[0], match.nodes[-1]
        conv = gm.get_submodule(match.fusion.conv)
        args: tuple[Any, ...] = (conv_node.args[0],)
        fusion = match.fusion
        if fusion.add is not None:
            add = match.nodes[-2]
            src = match.nodes[-3]
            z = add.args[1] if add.args[0] is src else add.args[0]
            args = (*args, z)  # read now: z may be rewritten
            source = _bias_source(traced, z, calls, read, names_of) if merge_residual_bias else None
            if source is not None:
                conv, fusion = _merge_bias(gm, conv, source), replace(fusion, bias_from=source)
            fused: nn.Module = ConvAddReLU(conv, fusion.max_value)
        else:
            fused = ConvReLU(conv, fusion.max_value)
        fusions.append(fusion)
        set_submodule(gm, match.fusion.conv, fused)  # gm's own module tree: model's stays as it was
        with graph.inserting_before(act):
            new = graph.call_module(match.fusion.conv, args)
        act.replace_all_uses_with(new)
        for node in reversed(match.nodes):
            graph.erase_node(node)
    graph.lint()
    gm.recompile()
    gm.eval()  # its fresh containers start in training mode; the traced forward is the eval-mode one
    return gm, fusions
