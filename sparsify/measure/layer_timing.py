"""One conv/linear layer timed as it runs in the deployed network (the unit of :class:`LatencyModel`).

A layer alone is not the layer in the network: after ``sparsify.deploy`` folds a BatchNorm the conv has a
bias, and where a ReLU follows, eager CUDA runs conv+bias+ReLU as one cuDNN kernel
(``torch.cudnn_convolution_relu``, as :class:`sparsify.nn.ConvReLU` does). With ``in_context`` (the
default) :func:`time_layer` times that: the conv with the bias BN folding gives it (``LayerSpec.folded_bn``)
and its ReLU (``LayerSpec.relu``), fused on CUDA where cuDNN can (2-d, zero padding cuDNN expresses),
channels_last, in the dtype used: under autocast (weights cast per call, as an autocast deployment does) or,
with ``cast_params``, with weights already in ``dtype`` (``deploy(..., dtype=...)``). Timing is
:func:`sparsify.measure.bench.benchmark` (CUDA graphs, L2 flushed, warm-up until settled on CUDA).
Not modelled: a residual add fused into the conv (``ConvAddReLU``), activations other than ReLU.
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

__all__ = ["LayerSpec", "time_layer"]


@dataclass(frozen=True)
class LayerSpec:
    """One conv/linear call of the trace: its weight, hyper-parameters, full widths and input shape."""

    name: str  # qualified name of the weight
    op: str  # "conv" or "linear"
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

    @property
    def depthwise(self) -> bool:
        return self.op == "conv" and self.groups > 1 and self.groups == self.in_channels == self.out_channels

    def groups_at(self, out_w: int) -> int:
        """The conv's ``groups`` once its output is ``out_w`` channels (whole conv groups are removed)."""
        if self.op != "conv" or self.groups == 1:
            return 1
        return max(out_w // (self.out_channels // self.groups), 1)

    def in_at(self, in_w: int, out_w: int) -> int:
        """Input width for kept widths: a grouped conv's input follows its output."""
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
                self.in_at(in_w, out_w), out_w, self.folded_bn, self.relu)


def _cudnn_padding(spec: LayerSpec) -> tuple[int, ...] | None:
    """The symmetric int padding cuDNN's fused kernel takes, or None where it has none."""
    if spec.padding_mode != "zeros":
        return None
    if spec.padding == "valid":
        return (0,) * len(spec.kernel_size)
    if isinstance(spec.padding, str):
        return None
    return tuple(int(p) for p in spec.padding)


def _layer_and_input(spec: LayerSpec, in_w: int, out_w: int, batch: int, bias: bool, channels_last: bool
                     ) -> tuple[nn.Module, torch.Tensor]:
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
          cast_params: bool) -> Callable[[torch.Tensor], Any]:
    """The layer's forward as deployed: fused conv+bias+ReLU on cuDNN, else the eager ops."""
    padding = _cudnn_padding(spec) if spec.op == "conv" and len(spec.kernel_size) == 2 else None
    cudnn = device.type == "cuda" and torch.backends.cudnn.is_available() and torch.backends.cudnn.enabled
    if relu and padding is not None and cudnn:
        assert isinstance(layer, nn.Conv2d)

        def fused(x: torch.Tensor) -> torch.Tensor:
            w, b = layer.weight, layer.bias
            if dtype is not None and w.dtype != dtype:  # autocast casts the weights at every call
                w, b = w.to(dtype), (None if b is None else b.to(dtype))
            return torch.cudnn_convolution_relu(x, w, b, layer.stride, padding, layer.dilation, layer.groups)

        return fused
    if relu:
        return lambda x: F.relu(layer(x))
    return layer


def time_layer(spec: LayerSpec, in_w: int, out_w: int, *, batch: int, device: torch.device | str = "cpu",
               dtype: torch.dtype | None = None, channels_last: bool = True, iters: int = 10, warmup: int = 3,
               in_context: bool = True, cast_params: bool = False) -> float:
    """Median ms of a fresh layer like ``spec`` with ``in_w`` inputs and ``out_w`` outputs (see the module
    docstring; ``in_context=False``: the layer alone, with its own bias and no activation)."""
    device = torch.device(device)
    in_w = spec.in_at(in_w, out_w)
    bias = spec.bias or (in_context and spec.folded_bn)
    layer, x = _layer_and_input(spec, in_w, out_w, batch, bias, channels_last)
    layer, x = layer.to(device).eval(), x.to(device)
    if dtype is not None:  # inside a network under autocast, activations arrive already cast
        x = x.to(dtype)
        if cast_params:
            layer = layer.to(dtype)
    forward = _call(layer, spec, device, dtype, in_context and spec.relu, cast_params)
    autocast = None if cast_params else dtype

    def run() -> None:
        with torch.no_grad(), autocast_context(device, autocast):
            forward(x)

    settle = warmup if device.type != "cuda" else max(warmup, 50)  # CPU: exactly `warmup` calls
    return benchmark(run, device=device, iters=iters, repeats=1, min_warmup=warmup, max_warmup=settle).p50
