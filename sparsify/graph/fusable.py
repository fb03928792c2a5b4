"""What deployment folds and fuses, found on a traced graph (no rewriting here).

Conv→BN pairs that fold exactly (:func:`foldable_bn_pairs`), and conv→[transparent …]→ReLU(6) and
conv→[transparent …]→add(·, z)→ReLU(6) patterns that fuse exactly into one cuDNN kernel (:func:`find_fusions`,
with the conv whose bias can move into a fused conv, :func:`bias_source`). Shared by :mod:`sparsify.deploy`
(which folds and fuses: there the transparent nodes are the Identities folded BNs left) and
:mod:`sparsify.measure.epilogue` (which times each conv as it will be deployed: there they are the BNs that
will fold), so the two agree by construction.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from sparsify.graph.trace import TensorInfo, TracedModel

__all__ = ["FusionMatch", "added_operand", "addition_operands", "bias_source", "cudnn_padding", "find_fusions",
           "foldable_bn_pairs", "hooked", "module_usage", "relu_activation"]

_BN = nn.modules.batchnorm._BatchNorm
_CONV = nn.modules.conv._ConvNd
Usage = tuple[dict[str, int], set[str], dict[int, int]]
Transparent = Callable[[fx.Node, nn.Module], bool]


def hooked(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks)


def module_usage(traced: TracedModel) -> Usage:
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


def cudnn_padding(conv: nn.Conv2d) -> tuple[int, ...] | None:
    """The conv's padding as the symmetric int padding cuDNN takes, or None where it has none."""
    if conv.padding_mode != "zeros":
        return None
    if conv.padding == "valid":
        return (0, 0)
    if conv.padding == "same":  # PyTorch pads the odd remainder on one side only
        total = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size, strict=True)]
        return tuple(t // 2 for t in total) if all(t % 2 == 0 for t in total) else None
    return tuple(int(p) for p in conv.padding)


_RELU_FUNCTIONS = (F.relu, torch.relu, torch.relu_, F.relu_)
_ADDS = (operator.add, operator.iadd, torch.add)


def relu_activation(node: fx.Node, gm: fx.GraphModule, src: fx.Node) -> tuple[bool, float | None]:
    """Whether ``node`` is a ReLU-like activation of ``src`` alone (a ReLU, or ReLU6 / ``Hardtanh(0, m)``:
    module, function or method), and its cap (None for a ReLU)."""
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


def addition_operands(node: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """``(a, b)`` when ``node`` is ``a + b`` of two graph values (function, operator or method; no alpha)."""
    is_add = (node.op == "call_function" and node.target in _ADDS) or (
        node.op == "call_method" and node.target in ("add", "add_"))
    if not is_add or len(node.args) != 2 or node.kwargs or not all(isinstance(a, fx.Node) for a in node.args):
        return None
    return node.args[0], node.args[1]  # type: ignore[return-value]


def added_operand(node: fx.Node, src: fx.Node) -> fx.Node | None:
    """The other operand when ``node`` is ``src + z`` (no alpha, z a graph value, src not written by z)."""
    operands = addition_operands(node)
    if operands is None or src not in operands:
        return None
    inplace = node.target is operator.iadd or node.target == "add_"
    if operands[0] is not src and (inplace or node.op == "call_method"):
        return None  # z += conv(x) writes to z, z.add(conv(x)) is a method of z: leave both
    z = operands[1] if operands[0] is src else operands[0]
    return z if z is not src else None


def foldable_bn_pairs(traced: TracedModel, usage: Usage | None = None
                      ) -> tuple[list[tuple[str, str]], dict[str, str]]:
    """Conv→BN pairs of the trace that fold exactly, and for other BNs after a conv, why not:
    ``([(conv name, bn name), ...], {bn name: reason})`` (see :mod:`sparsify.deploy.fold_bn`)."""
    gm = traced.graph_module
    calls, read, names_of = usage or module_usage(traced)
    pairs, refused = [], {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(gm.get_submodule(str(node.target)), _BN):
            continue
        bn_name, bn = str(node.target), gm.get_submodule(str(node.target))
        src = node.args[0] if node.args else None
        if not isinstance(src, fx.Node) or src.op != "call_module" or not isinstance(
                gm.get_submodule(str(src.target)), _CONV):
            continue
        conv_name, conv = str(src.target), gm.get_submodule(str(src.target))
        why = ""
        if len(node.args) != 1 or node.kwargs:
            why = "the BN is called with extra arguments"
        elif len(src.users) != 1:
            why = f"the output of '{conv_name}' is also used outside the BN"
        elif calls[conv_name] != 1 or names_of[id(conv)] != 1:
            why = f"'{conv_name}' is used more than once"
        elif calls[bn_name] != 1 or names_of[id(bn)] != 1:
            why = f"'{bn_name}' is used more than once"
        elif conv_name in read or bn_name in read:
            why = "their tensors are read elsewhere in the graph"
        elif not bn.track_running_stats or bn.running_mean is None or bn.running_var is None:
            why = "the BN has no running statistics (it normalises with batch statistics even in eval mode)"
        if why:
            refused[bn_name] = why
        else:
            pairs.append((conv_name, bn_name))
    return pairs, refused


def identity_only(node: fx.Node, module: nn.Module) -> bool:
    """The transparent nodes of a folded model: the Identities folded BatchNorms left."""
    return type(module) is nn.Identity


@dataclass(frozen=True)
class FusionMatch:
    """One fusable pattern: the conv's module name, the activation (module name, or node name for a function),
    the add node's name (a residual fusion) and the added tensor's node, the activation's cap, and every node
    from the conv to the activation in graph order."""

    conv: str
    activation: str
    add: str | None
    z: fx.Node | None
    max_value: float | None
    nodes: tuple[fx.Node, ...]


def find_fusions(traced: TracedModel, transparent: Transparent = identity_only, usage: Usage | None = None
                 ) -> tuple[list[FusionMatch], dict[str, str]]:
    """Conv→act and conv→add→act patterns that fuse exactly (see :mod:`sparsify.deploy.fusion`), in graph order
    (a residual add's activation goes to the first of its convs), and for other convs followed by an
    activation, why not: ``([FusionMatch, ...], {conv name: reason})``. ``transparent(node, module)`` says
    which single-input modules between the conv and the activation vanish when deployed."""
    gm = traced.graph_module
    calls, read, names_of = usage or module_usage(traced)
    matches: list[FusionMatch] = []
    refused: dict[str, str] = {}
    claimed: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        conv = gm.get_submodule(str(node.target))
        if not isinstance(conv, nn.Conv2d) or type(conv).forward is not nn.Conv2d.forward:
            continue
        name = str(node.target)
        chain, end, why = [node], node, ""
        while len(end.users) == 1:  # skip the transparent modules (folded BatchNorms)
            user = next(iter(end.users))
            if user.op != "call_module" or not transparent(user, gm.get_submodule(str(user.target))):
                break
            if len(user.args) != 1 or user.kwargs or hooked(gm.get_submodule(str(user.target))):
                break
            chain.append(user)
            end = user
        users = list(end.users)
        acts = [u for u in users if relu_activation(u, gm, end)[0]]
        add = z = None
        if len(users) == 1 and not acts:
            z = added_operand(users[0], end)
            if z is not None:
                add = users[0]
                acts = [u for u in add.users if relu_activation(u, gm, add)[0]]
                if len(add.users) != 1 and acts:
                    why = "the sum is also used outside the activation"
        if not acts or acts[0] in claimed:  # a residual add's activation is fused with one of its convs
            continue
        act = acts[0]
        _, cap = relu_activation(act, gm, add if add is not None else end)
        why = why or _refusal(traced, node, conv, users, act, add, z, (calls, read, names_of))
        if why:
            refused[name] = why
            continue
        claimed.add(act)
        act_name = str(act.target) if act.op == "call_module" else act.name
        matches.append(FusionMatch(name, act_name, None if add is None else add.name, z, cap,
                                   (*chain, *([add] if add is not None else []), act)))
    return matches, refused


def _refusal(traced: TracedModel, node: fx.Node, conv: nn.Conv2d, users: list[fx.Node], act: fx.Node,
             add: fx.Node | None, z: fx.Node | None, usage: Usage) -> str:
    """Why the conv at ``node`` may not be fused with ``act`` (and ``add``), or ''."""
    gm, name = traced.graph_module, str(node.target)
    calls, read, names_of = usage
    leaf = next((t for t in calls if name.startswith(t + ".")), None)
    if leaf is not None:
        return f"'{name}' lives inside the module '{leaf}', which is called as a whole"
    if len(users) != 1:
        return f"the output of '{name}' is also used outside the activation"
    if len(node.args) != 1 or node.kwargs:
        return f"'{name}' is called with extra arguments"
    if conv.groups != 1:  # H100, MobileNetV2's 17 depthwise convs: 29.7 ms fused, ~1.5 ms unfused
        return f"'{name}' is a grouped conv (cuDNN's fused kernel for grouped/depthwise convs is slow)"
    if cudnn_padding(conv) is None:
        return (f"'{name}' pads with '{conv.padding_mode}'" if conv.padding_mode != "zeros" else f"'{name}' "
                "has padding='same' with an even kernel (asymmetric padding; cuDNN pads symmetrically)")
    if calls[name] != 1 or names_of[id(conv)] != 1:
        return f"'{name}' is used more than once"
    if name in read:
        return f"the tensors of '{name}' are read elsewhere in the graph"
    if hooked(conv) or (act.op == "call_module" and hooked(gm.get_submodule(str(act.target)))):
        return "forward hooks are registered on the conv or the activation"
    if add is not None and not _same_shape(traced, z, add, node):
        return "the added tensor's shape differs from the conv output's (broadcasting)"
    return ""


def _same_shape(traced: TracedModel, z: Any, add: fx.Node, conv: fx.Node) -> bool:
    infos = [traced.values.get(n.name) for n in (z, add, conv)]
    return all(isinstance(i, TensorInfo) for i in infos) and infos[0].shape == infos[1].shape == infos[2].shape \
        and infos[0].dtype == infos[2].dtype


def bias_source(traced: TracedModel, z: fx.Node, usage: Usage, transparent: Transparent = identity_only,
                has_bias: Callable[[str, nn.Conv2d], bool] | None = None) -> str | None:
    """The plain conv computing ``z`` alone (through transparent modules, every value used once) whose bias can
    move into the conv a residual add is fused with, or None. ``has_bias(name, conv)``: whether it has a bias
    once deployed (default: ``conv.bias is not None``)."""
    gm, node = traced.graph_module, z
    calls, read, names_of = usage
    while node.op == "call_module" and transparent(node, gm.get_submodule(str(node.target))):
        if len(node.users) != 1 or len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], fx.Node):
            return None
        node = node.args[0]
    if node.op != "call_module" or len(node.users) != 1:
        return None
    name = str(node.target)
    conv = gm.get_submodule(name)
    if not (isinstance(conv, nn.Conv2d) and type(conv).forward is nn.Conv2d.forward):
        return None
    biased = has_bias(name, conv) if has_bias is not None else conv.bias is not None
    if not biased or calls.get(name) != 1 or names_of.get(id(conv)) != 1 or name in read or hooked(conv):
        return None
    if any(name.startswith(t + ".") for t in calls):  # inside a module called as a whole
        return None
    return name
