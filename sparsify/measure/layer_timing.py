"""One conv/linear layer timed as it runs in the deployed network (the unit of :class:`LatencyModel`).

A layer alone is not the layer in the network: after ``sparsify.deploy`` folds a BatchNorm the conv has a
bias, and where a ReLU follows, eager CUDA runs conv+bias+ReLU as one cuDNN kernel
(``torch.cudnn_convolution_relu``, as :class:`sparsify.nn.ConvReLU` does), and where a residual add then a
ReLU follow, conv+bias+add+ReLU is one kernel too (``torch.cudnn_convolution_add_relu``,
:class:`sparsify.nn.ConvAddReLU`). With ``in_context`` (the default) :func:`time_layer` times that: the conv
with the bias BN folding gives it (``LayerSpec.folded_bn``) and its ReLU (``LayerSpec.relu``) or add and ReLU
(``LayerSpec.add_relu``; the conv computing the added tensor without its bias, ``LayerSpec.bias_merged``,
as deployment merges it into the fused conv), fused on CUDA where deployment fuses (2-d, not grouped, zero padding cuDNN
expresses), channels_last, in the dtype used: under autocast (weights cast per call, as an autocast
deployment does) or, with ``cast_params``, with weights already in ``dtype`` (``deploy(..., dtype=...)``).
Timing is :func:`sparsify.measure.bench.benchmark` (CUDA graphs, L2 flushed, warm-up until settled on CUDA).
Not modelled: activations other than ReLU and ReLU6 / ``Hardtanh(0, m)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sparsify.measure.bench import benchmark
from sparsify.measure.timing import autocast_context

__all__ = ["POOLS", "LayerSpec", "time_layer"]

POOLS = ("max_pool2d", "avg_pool2d")  # pooling ops timed as layers (sparsify.measure.pooling)


@dataclass(frozen=True)
class LayerSpec:
    """One conv/linear call of the trace (or a pool, whose width follows the layer before it): its weight,
    hyper-parameters, full widths and input shape."""

    name: str  # qualified name of the weight (a pool: its module path or node name)
    op: str  # "conv", "linear", or a pool in POOLS
    in_channels: int
    out_channels: int
    input_shape: tuple[int, ...]  # one example, no batch dim: (C, *spatial) for convs, (*tokens, C) for linear
    kernel_size: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    padding: Any = ()
    dilation: tuple[int, ...] = ()
    groups: int = 1
    bias: bool = True
    padding_mode: str = "zeros"
    macs: float = 0.0  # per example, dense (sparsify.graph.cost.module_macs)
    folded_bn: bool = False  # a BatchNorm follows alone: deployed, it is folded into a conv bias
    relu: bool = False  # a ReLU follows (after the BN if any): deployed on CUDA, fused into the conv
    add_relu: bool = False  # a residual add then a ReLU follow (after the BN if any): deployed, one fused kernel
    bias_merged: bool = False  # its output is only another conv's fused residual: deployed, its bias moves there
    relu_cap: float | None = None  # the fused activation is ReLU6 / Hardtanh(0, cap) (deployed: ReLU, then a clamp)
    follows: str | None = None  # a pool: the layer whose output width it has
    ceil_mode: bool = False  # a pool's ceil_mode

    @property
    def depthwise(self) -> bool:
        return self.op == "conv" and self.groups > 1 and self.groups == self.in_channels == self.out_channels

    def groups_at(self, out_w: int) -> int:
        """The conv's ``groups`` once its output is ``out_w`` channels (whole conv groups are removed)."""
        if self.op != "conv" or self.groups == 1:
            return 1
        return max(out_w // (self.out_channels // self.groups), 1)

    def in_at(self, in_w: int, out_w: int) -> int:
        """Input width for kept widths: a grouped conv's (and a pool's) input follows its output."""
        if self.op in POOLS:
            return out_w
        if self.op == "conv" and self.groups > 1:
            return self.groups_at(out_w) * (self.in_channels // self.groups)
        return in_w

    def macs_at(self, in_w: int, out_w: int) -> float:
        """Per example MACs at these widths."""
        if self.op == "conv" and self.groups > 1:
            return self.macs * out_w / self.out_channels
        return self.macs * (in_w / self.in_channels) * (out_w / self.out_channels)

    def signature(self, in_w: int, out_w: int) -> tuple:
        """What a timing depends on: identical signatures share one measurement."""
        return (self.op, self.input_shape[1:] if self.op == "conv" else self.input_shape[:-1], self.kernel_size,
                self.stride, self.padding, self.dilation, self.groups_at(out_w), self.bias, self.padding_mode,
                self.in_at(in_w, out_w), out_w, self.folded_bn, self.relu) + \
            (("add_relu",) if self.add_relu else ()) + (("bias_merged",) if self.bias_merged else ()) + \
            (("ceil_mode",) if self.ceil_mode else ()) + (("cap", self.relu_cap) if self.relu_cap is not None else ())


def _cudnn_padding(spec: LayerSpec) -> tuple[int, ...] | None:
    """The symmetric int padding cuDNN's fused kernel takes, or None where it has none."""
    if spec.padding_mode != "zeros":
        return None
    if spec.padding == "valid":
        return (0,) * len(spec.kernel_size)
    if isinstance(spec.padding, str):
        return None
    return tuple(int(p) for p in spec.padding)


def _pool(spec: LayerSpec) -> nn.Module:
    if spec.op == "max_pool2d":
        return nn.MaxPool2d(spec.kernel_size, spec.stride, spec.padding, spec.dilation, ceil_mode=spec.ceil_mode)
    return nn.AvgPool2d(spec.kernel_size, spec.stride, spec.padding, ceil_mode=spec.ceil_mode)


def _layer_and_input(spec: LayerSpec, in_w: int, out_w: int, batch: int, bias: bool, channels_last: bool
                     ) -> tuple[nn.Module, torch.Tensor]:
    if spec.op in POOLS:
        x = torch.randn(batch, out_w, *spec.input_shape[1:])
        return _pool(spec), (x.contiguous(memory_format=torch.channels_last) if channels_last else x)
    if spec.op == "linear":
        return nn.Linear(in_w, out_w, bias=bias), torch.randn(batch, *spec.input_shape[:-1], in_w)
    nd = len(spec.kernel_size)
    cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[nd]
    layer = cls(in_w, out_w, spec.kernel_size, spec.stride, spec.padding, spec.dilation, spec.groups_at(out_w),
                bias=bias, padding_mode=spec.padding_mode)
    x = torch.randn(batch, in_w, *spec.input_shape[1:])
    fmt = {2: torch.channels_last, 3: torch.channels_last_3d}.get(nd) if channels_last else None
    if fmt is not None:
        layer, x = layer.to(memory_format=fmt), x.contiguous(memory_format=fmt)
    return layer, x


def _call(layer: nn.Module, spec: LayerSpec, device: torch.device, dtype: torch.dtype | None, relu: bool,
          residual: torch.Tensor | None) -> Callable[[torch.Tensor], Any]:
    """The layer's forward as deployed: fused conv+bias(+add)+ReLU on cuDNN (then the clamp of a ReLU6), else
    the eager ops (``residual``: the tensor a residual add brings, or None)."""
    padding = _cudnn_padding(spec) if spec.op == "conv" and len(spec.kernel_size) == 2 else None
    cudnn = device.type == "cuda" and torch.backends.cudnn.is_available() and torch.backends.cudnn.enabled
    # deployment fuses plain convs only (sparsify.deploy.fusion: cuDNN's fused grouped/depthwise kernels are slow)
    fusable = padding is not None and cudnn and getattr(layer, "groups", 1) == 1
    cap = spec.relu_cap

    def act(y: torch.Tensor) -> torch.Tensor:
        return F.relu(y) if cap is None else F.hardtanh(y, 0.0, cap)

    if (relu or residual is not None) and fusable:
        assert isinstance(layer, nn.Conv2d)

        def weights() -> tuple[torch.Tensor, torch.Tensor | None]:
            w, b = layer.weight, layer.bias
            if dtype is not None and w.dtype != dtype:  # autocast casts the weights at every call
                w, b = w.to(dtype), (None if b is None else b.to(dtype))
            return w, b

        def fused(x: torch.Tensor) -> torch.Tensor:
            w, b = weights()
            if residual is not None:
                y = torch.cudnn_convolution_add_relu(x, w, residual, 1, b, layer.stride, padding, layer.dilation,
                                                     layer.groups)
            else:
                y = torch.cudnn_convolution_relu(x, w, b, layer.stride, padding, layer.dilation, layer.groups)
            return y if cap is None else y.clamp_max_(cap)

        return fused
    if residual is not None:
        return lambda x: act(layer(x) + residual)
    if relu:
        return lambda x: act(layer(x))
    return layer


def time_layer(spec: LayerSpec, in_w: int, out_w: int, *, batch: int, device: torch.device | str = "cpu",
               dtype: torch.dtype | None = None, channels_last: bool = True, iters: int = 10, warmup: int = 3,
               in_context: bool = True, cast_params: bool = False) -> float:
    """Median ms of a fresh layer like ``spec`` with ``in_w`` inputs and ``out_w`` outputs (see the module
    docstring; ``in_context=False``: the layer alone, with its own bias, no add and no activation)."""
    device = torch.device(device)
    in_w = spec.in_at(in_w, out_w)
    bias = (spec.bias or (in_context and spec.folded_bn)) and not (in_context and spec.bias_merged)
    layer, x = _layer_and_input(spec, in_w, out_w, batch, bias, channels_last)
    layer, x = layer.to(device).eval(), x.to(device)
    if dtype is not None:  # inside a network under autocast, activations arrive already cast
        x = x.to(dtype)
        if cast_params:
            layer = layer.to(dtype)
    autocast = None if cast_params else dtype
    residual = None
    if in_context and spec.add_relu:  # the added tensor: the conv output's shape, dtype and memory format
        with torch.no_grad(), autocast_context(device, autocast):
            residual = torch.randn_like(layer(x))
    forward = _call(layer, spec, device, dtype, in_context and spec.relu, residual)

    def run() -> None:
        with torch.no_grad(), autocast_context(device, autocast):
            forward(x)

    settle = warmup if device.type != "cuda" else max(warmup, 50)  # CPU: exactly `warmup` calls
    return benchmark(run, device=device, iters=iters, repeats=1, min_warmup=warmup, max_warmup=settle).p50
