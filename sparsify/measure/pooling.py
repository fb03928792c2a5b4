"""Pooling layers in the latency model: a max/avg pool's time follows the width of the conv that feeds it.

A pool has no weights, so no group slices it; but its channels are those of the conv or linear before it
(through BatchNorms, ReLUs and other per-channel ops), and on a GPU it is memory-bound: ResNet-50's stem
max pool is ~0.8 of its 6.9 ms at batch 256 bf16 on an H200, all of it saved in proportion when the stem is
narrowed. :func:`pool_spec` describes a 2-d ``nn.MaxPool2d`` / ``nn.AvgPool2d`` (or ``F.max_pool2d`` /
``F.avg_pool2d``) as a :class:`~sparsify.measure.layer_timing.LayerSpec` that ``follows`` its producer; the
latency model gives it the producer's output group. Pools whose producer is not found (after an add, a
concatenation, a reshape) are not modelled.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch.fx as fx
from torch import nn

from sparsify.graph.trace import TensorInfo
from sparsify.measure.layer_timing import POOLS, LayerSpec

__all__ = ["pool_spec"]

# ops between a layer and a pool that keep its channels one for one
_PER_CHANNEL = ("batchnorm", "relu", "relu6", "hardtanh", "silu", "gelu", "identity", "getitem", "dropout",
                "leakyrelu", "leaky_relu", "hardswish", "sigmoid", "tanh", "elu", "mish")


def op_name(gm: fx.GraphModule, node: fx.Node) -> str:
    """What a node computes, by name: a module's class, a function's or a method's name (lower case)."""
    if node.op == "call_module":
        return type(gm.get_submodule(str(node.target))).__name__.lower()
    if node.op in ("call_function", "call_method"):
        return str(getattr(node.target, "__name__", node.target)).lower()
    return ""


def _producer(gm: fx.GraphModule, node: fx.Node, layer_of: Mapping[fx.Node, str]) -> str | None:
    """The modelled conv/linear whose output channels reach ``node`` through per-channel ops only."""
    while node not in layer_of:
        name = op_name(gm, node).replace("_", "").rstrip("d0123456789")
        if not any(name.startswith(p.replace("_", "")) for p in _PER_CHANNEL) or not node.args:
            return None
        if not isinstance(node.args[0], fx.Node):
            return None
        node = node.args[0]
    return layer_of[node]


def _pool_args(gm: fx.GraphModule, node: fx.Node) -> tuple[str, Any, Any, Any, Any, bool] | None:
    """(op, kernel, stride, padding, dilation, ceil_mode) of a 2-d max/avg pool node, or None."""
    if node.op == "call_module":
        m = gm.get_submodule(str(node.target))
        if type(m) is nn.MaxPool2d and not m.return_indices:
            return "max_pool2d", m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode
        if type(m) is nn.AvgPool2d and m.count_include_pad and m.divisor_override is None:
            return "avg_pool2d", m.kernel_size, m.stride, m.padding, 1, m.ceil_mode
        return None
    name = getattr(node.target, "__name__", "") if node.op == "call_function" else ""
    if name not in POOLS:
        return None
    names = ["kernel_size", "stride", "padding", "dilation" if name == "max_pool2d" else "ceil_mode", "ceil_mode"]
    values = dict(zip(names, node.args[1:], strict=False)) | dict(node.kwargs)
    if values.get("return_indices") or (name == "avg_pool2d" and (not values.get("count_include_pad", True) or
                                                                  values.get("divisor_override") is not None)):
        return None
    kernel = values.get("kernel_size")
    stride = values.get("stride") or kernel
    return (name, kernel, stride, values.get("padding", 0), values.get("dilation", 1) if name == "max_pool2d" else 1,
            bool(values.get("ceil_mode", False)))


def _pair(v: Any) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (tuple, list)) else (int(v), int(v))


def pool_spec(gm: fx.GraphModule, node: fx.Node, x: Any, layer_of: Mapping[fx.Node, str]) -> LayerSpec | None:
    """A pool node as a LayerSpec that follows its producer's output width, or None (not a pool, or no
    producer found)."""
    if not isinstance(x, TensorInfo) or len(x.shape) != 4 or not node.args:
        return None
    args = _pool_args(gm, node)
    if args is None or not all(isinstance(a, (int, tuple, list)) for a in args[1:5]):
        return None
    producer = _producer(gm, node.args[0], layer_of) if isinstance(node.args[0], fx.Node) else None
    if producer is None:
        return None
    op, kernel, stride, padding, dilation, ceil_mode = args
    channels = int(x.shape[1])
    name = str(node.target) if node.op == "call_module" else node.name
    return LayerSpec(name, op, channels, channels, tuple(x.shape[1:]), _pair(kernel), _pair(stride), _pair(padding),
                     _pair(dilation), bias=False, follows=producer, ceil_mode=ceil_mode)
