"""Export two of a model's identical layers and replicate the second's graph for the others (issue #20).

``torch.export`` costs about 0.1 s per decoder layer of a Hugging Face LLM on the CPU. Where an
integration names a ``ModuleList`` of layers that the model's forward runs one after the other (the
decoder layers of a causal LM, :func:`register_repeated_layers`), and those layers are structurally
identical (same classes, parameter and buffer shapes, attributes other than ``layer_idx``, no hooks),
the model is exported with only its first two layers, and the nodes of layer 1 are copied once per
further layer, with that layer's parameters. Nodes are named as torch.export names them, so the
channel groups, and every reason in them, equal the full export's.

Anything unexpected (the two exported layers differ, a layer reads more than its predecessor's output
or is read by more than its successor, interleaved code between layers) returns ``None`` and the caller
exports the whole model; the caller also compares the replicated graph's outputs with the model's.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.nn.utils import parametrize

from sparsify._utils import is_meta

#: Functions model → dotted path of its list of layers run in sequence (or None); integrations add them.
REPEATED_LAYERS: list[Callable[[nn.Module], str | None]] = []

_PLAIN = (int, float, str, bool, type(None), torch.dtype, torch.device)
_SUFFIX = re.compile(r"^(.*)_(\d+)$")
_MIN_LAYERS = 3  # with two layers nothing is saved


def register_repeated_layers(fn: Callable[[nn.Module], str | None]) -> None:
    """Register ``fn(model)`` → the dotted path of a ``ModuleList`` whose layers forward() runs in order."""
    if fn not in REPEATED_LAYERS:
        REPEATED_LAYERS.append(fn)


def _layer_key(layer: nn.Module) -> tuple[Any, ...] | None:
    """What makes two layers trace alike; None if ``layer`` has forward hooks or parametrizations."""
    rows = []
    for name, sub in layer.named_modules():
        if parametrize.is_parametrized(sub):
            return None
        attrs = []
        for k, v in vars(sub).items():
            if k.startswith(("_forward", "_backward")) and v:
                return None
            if k.startswith("_") or k == "layer_idx":
                continue
            attrs.append((k, v if isinstance(v, _PLAIN) or (isinstance(v, tuple) and all(
                isinstance(e, _PLAIN) for e in v)) else id(v)))
        tensors = [(n, tuple(t.shape), t.dtype, isinstance(t, nn.Parameter))
                   for n, t in (*sub._parameters.items(), *sub._buffers.items()) if t is not None]
        rows.append((name, type(sub), tuple(tensors), tuple(attrs)))
    return tuple(rows)


def repeated_layers(model: nn.Module) -> str | None:
    """The path of ``model``'s registered list of ≥ 3 identical layers, or None (also on the meta device,
    where the replicated graph's outputs cannot be checked against the model's)."""
    if is_meta(model):
        return None
    for fn in REPEATED_LAYERS:
        path = fn(model)
        if path is None:
            continue
        layers = model.get_submodule(path)
        if not isinstance(layers, nn.ModuleList) or len(layers) < _MIN_LAYERS:
            return None
        keys = [_layer_key(layer) for layer in layers]
        return path if keys[0] is not None and all(k == keys[0] for k in keys) else None
    return None


def export_replicated(model: nn.Module, path: str, export: Callable[[nn.Module], fx.GraphModule]
                      ) -> fx.GraphModule | None:
    """``export(model)`` run with the layers at ``path`` cut to two, then layer 1's nodes replicated
    for the others; None where the exported graph is not two chained copies of one layer."""
    layers = model.get_submodule(path)
    parent_name, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_name)
    setattr(parent, attr, nn.ModuleList(list(layers)[:2]))
    try:
        gm = export(model)
    finally:
        setattr(parent, attr, layers)
    return _replicate(gm, model, path, len(layers))


def _layer_of(node: fx.Node, path: str) -> int | None:
    if node.op == "get_attr":
        for i in (0, 1):
            if str(node.target).startswith(f"{path}.{i}."):
                return i
        return None
    for module_path, _ in (node.meta.get("nn_module_stack") or {}).values():
        for i in (0, 1):
            if module_path == f"{path}.{i}" or module_path.startswith(f"{path}.{i}."):
                return i
    return None


def _shape(node: fx.Node) -> tuple[Any, ...]:
    """The op and its non-node arguments: equal for the same code in two layers."""
    target = str(node.target).replace(".1.", ".0.") if node.op == "get_attr" else node.target
    return node.op, target, fx.map_arg((node.args, node.kwargs), lambda _: None)


def _replicate(gm: fx.GraphModule, model: nn.Module, path: str, n: int) -> fx.GraphModule | None:
    nodes = list(gm.graph.nodes)
    where = {node: _layer_of(node, path) for node in nodes}
    ops = {i: [nd for nd in nodes if where[nd] == i and nd.op != "get_attr"] for i in (0, 1)}
    attrs = [nd for nd in nodes if where[nd] == 1 and nd.op == "get_attr"]
    if not ops[0] or len(ops[0]) != len(ops[1]) or [_shape(a) for a in ops[0]] != [_shape(b) for b in ops[1]]:
        return None
    position = {nd: k for k, nd in enumerate(nodes)}
    span = [position[nd] for nd in ops[0] + ops[1]]
    if span != list(range(span[0], span[0] + len(span))):  # layer 0 then layer 1, nothing in between
        return None
    seg1 = set(ops[1]) | set(attrs)
    inputs = {a for nd in ops[1] for a in nd.all_input_nodes if a not in seg1}
    from_layer0 = [a for a in inputs if where[a] == 0]
    outputs = [nd for nd in ops[1] if any(u not in seg1 for u in nd.users)]
    if len(from_layer0) != 1 or len(outputs) != 1 or any(where[a] == 1 for a in inputs):
        return None
    (out0,), (out1,) = from_layer0, outputs
    if any(u not in set(ops[0]) | seg1 for u in out0.users) or any(u not in seg1 for a in attrs for u in a.users):
        return None
    own = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers(remove_duplicate=False))
    for k in range(2, n):
        for a in attrs:
            target = _retarget(str(a.target), path, k)
            if target not in own:
                return None
            _bind(gm, target, own[target])
    gm.graph = _rebuilt(gm.graph, path, n, attrs, ops[1], out0, out1)
    return gm


def _retarget(target: str, path: str, k: int) -> str:
    return f"{path}.{k}." + target[len(f"{path}.1."):]


def _bind(gm: fx.GraphModule, target: str, tensor: torch.Tensor) -> None:
    holder: nn.Module = gm
    *parts, attr = target.split(".")
    for part in parts:
        if not hasattr(holder, part):
            holder.add_module(part, nn.Module())
        holder = getattr(holder, part)
    if isinstance(tensor, nn.Parameter):
        holder.register_parameter(attr, tensor)
    else:
        holder.register_buffer(attr, tensor)


def _base(node: fx.Node) -> str:
    """The name torch.export's counter starts from: ``linear_3`` → ``linear``, ``pow_1`` → ``pow``."""
    if node.op in ("placeholder", "output"):
        return node.name
    match = _SUFFIX.match(node.name)
    return match.group(1) if match else node.name


def _rebuilt(graph: fx.Graph, path: str, n: int, attrs: list[fx.Node], layer: list[fx.Node],
             out0: fx.Node, out1: fx.Node) -> fx.Graph:
    """The graph with layer 1's get_attrs and nodes copied for layers 2 … n-1, named in graph order."""
    new = fx.Graph()
    new._codegen = copy.deepcopy(graph._codegen)  # the pytree in/out structure of the exported module
    env: dict[fx.Node, fx.Node] = {}

    def emit(node: fx.Node, lookup: Callable[[fx.Node], fx.Node], k: int | None = None) -> fx.Node:
        args, kwargs = fx.map_arg((node.args, node.kwargs), lookup)
        target = _retarget(str(node.target), path, k) if k is not None and node.op == "get_attr" else node.target
        name = target.replace(".", "_") if k is not None and node.op == "get_attr" else _base(node)
        copied = new.create_node(node.op, target, args, kwargs, name=name, type_expr=node.type)
        copied.meta = copy.copy(node.meta)
        if k is not None and "nn_module_stack" in node.meta:
            copied.meta["nn_module_stack"] = {key: (p.replace(f"{path}.1", f"{path}.{k}", 1), cls)
                                              for key, (p, cls) in node.meta["nn_module_stack"].items()}
        return copied

    copies: dict[int, dict[fx.Node, fx.Node]] = {k: {} for k in range(2, n)}
    for node in graph.nodes:
        env[node] = emit(node, env.__getitem__)
        if attrs and node is attrs[-1]:
            for k in range(2, n):
                for a in attrs:
                    copies[k][a] = emit(a, env.__getitem__, k)
        if node is layer[-1]:
            last_out = env[out1]
            for k in range(2, n):
                local = copies[k]
                local[out0] = last_out
                for nd in layer:
                    local[nd] = emit(nd, lambda a, local=local: local[a] if a in local else env[a], k)
                last_out = local[out1]
            env[out1] = last_out  # what followed the last layer reads the last copy
    return new
