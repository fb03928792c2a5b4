"""Conv + bias + ReLU (and + residual add) as one cuDNN kernel, for deployed models run eagerly on CUDA.

In eager PyTorch a conv's bias, the ReLU after it and a residual add are separate kernels; after BN folding
the bias add alone is slow on channels_last tensors. cuDNN computes ``relu(conv(x) + b)`` and
``relu(conv(x) + z + b)`` in one kernel (``torch.cudnn_convolution_relu`` / ``cudnn_convolution_add_relu``).
:class:`ConvReLU` and :class:`ConvAddReLU` wrap an ``nn.Conv2d`` and use them for CUDA tensors (cuDNN on,
float16/bfloat16/float32, also under autocast, no gradient needed); anywhere else they compute the original
``act(conv(x))`` / ``act(conv(x) + z)`` exactly. :func:`sparsify.deploy.fuse_conv_activations` inserts them.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from sparsify.graph.fusable import cudnn_padding
from sparsify.graph.module_types import register_module_type
from sparsify.measure.timing import cuda_autocast_dtype

__all__ = ["ConvAddReLU", "ConvReLU", "cudnn_padding"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # dtypes cuDNN fuses


def _on_cudnn(x: torch.Tensor) -> bool:
    """Whether cuDNN's fused kernels may run on ``x`` (they ignore requests for deterministic algorithms)."""
    cudnn = torch.backends.cudnn
    return x.is_cuda and cudnn.enabled and cudnn.is_available() and not (
        cudnn.deterministic or torch.are_deterministic_algorithms_enabled())


def _compute_dtype(x: torch.Tensor, conv: nn.Conv2d, z: torch.Tensor | None = None) -> torch.dtype | None:
    """The dtype the fused cuDNN kernel runs in, or None where the original math must run."""
    if not _on_cudnn(x) or x.dim() != 4:
        return None
    params = [conv.weight] if conv.bias is None else [conv.weight, conv.bias]
    tensors = [x, *params] if z is None else [x, *params, z]
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return None  # the fused ops have no backward
    dtype = cuda_autocast_dtype()
    if dtype is not None:  # autocast casts the conv's floating inputs (not float64) to its dtype
        ok = dtype in _DTYPES and all(t.dtype in _DTYPES for t in [x, *params])
    else:
        dtype = x.dtype
        ok = dtype in _DTYPES and all(t.dtype == dtype for t in params)
    # z is added to the conv's output as is: another dtype would promote the sum, so the original runs
    return dtype if ok and (z is None or z.dtype == dtype) else None


def _activation(y: torch.Tensor, max_value: float | None) -> torch.Tensor:
    return F.relu(y) if max_value is None else F.hardtanh(y, 0.0, max_value)


class _Fused(nn.Module):
    def __init__(self, conv: nn.Conv2d, max_value: float | None = None) -> None:
        super().__init__()
        if type(conv).forward is not nn.Conv2d.forward or cudnn_padding(conv) is None:
            raise ValueError(f"{type(self).__name__} needs a plain nn.Conv2d with zero padding that cuDNN can "
                             f"express, got {conv!r}")
        self.conv = conv
        self.max_value = max_value
        self.failed = False  # set when cuDNN refused a call: the original math runs from then on

    def extra_repr(self) -> str:
        return "" if self.max_value is None else f"max_value={self.max_value}"

    def _cast(self, x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        bias = self.conv.bias
        return x.to(dtype), self.conv.weight.to(dtype), None if bias is None else bias.to(dtype)

    def _refused(self, exc: RuntimeError) -> None:
        self.failed = True
        warnings.warn(f"{type(self).__name__}: cuDNN's fused kernel failed ({str(exc).splitlines()[0][:200]}); "
                      "this module computes conv and activation separately from now on.", stacklevel=3)


class ConvReLU(_Fused):
    """``act(conv(x))`` with ``act`` a ReLU (``max_value=None``) or ``hardtanh(·, 0, max_value)`` (ReLU6)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.conv
        dtype = None if self.failed else _compute_dtype(x, conv)
        if dtype is None:
            return _activation(conv(x), self.max_value)
        x_, weight, bias = self._cast(x, dtype)
        try:
            y = torch.cudnn_convolution_relu(x_, weight, bias, conv.stride, cudnn_padding(conv), conv.dilation,
                                             conv.groups)
        except RuntimeError as exc:
            self._refused(exc)
            return _activation(conv(x), self.max_value)
        return y if self.max_value is None else y.clamp_max_(self.max_value)


class ConvAddReLU(_Fused):
    """``act(conv(x) + z)``, ``z`` of the conv output's shape; ``act`` as in :class:`ConvReLU`."""

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        conv = self.conv
        dtype = None if self.failed else _compute_dtype(x, conv, z)
        padding = cudnn_padding(conv)
        if dtype is None or tuple(z.shape) != _output_shape(x, conv, padding):
            return _activation(conv(x) + z, self.max_value)
        x_, weight, bias = self._cast(x, dtype)
        try:
            y = torch.cudnn_convolution_add_relu(x_, weight, z, 1, bias, conv.stride, padding, conv.dilation,
                                                 conv.groups)
        except RuntimeError as exc:
            self._refused(exc)
            return _activation(conv(x) + z, self.max_value)
        return y if self.max_value is None else y.clamp_max_(self.max_value)


def _output_shape(x: torch.Tensor, conv: nn.Conv2d, padding: tuple[int, ...] | None) -> tuple[int, ...]:
    if padding is None:
        return ()
    spatial = [(size + 2 * p - d * (k - 1) - 1) // s + 1 for size, p, d, k, s in
               zip(x.shape[2:], padding, conv.dilation, conv.kernel_size, conv.stride, strict=True)]
    return (x.shape[0], conv.out_channels, *spatial)


# the sparsify tracer keeps them as single nodes: a deployed model traces (and deploys) again
register_module_type(ConvReLU, leaf=True)
register_module_type(ConvAddReLU, leaf=True)
