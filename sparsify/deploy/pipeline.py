"""Make a (pruned) model ready for inference: ``deploy()`` runs the steps of this package in order.

Eval mode, BatchNorm folded into the convs (``fold_bn.py``), an optional space-to-depth stem
(``stem.py``), one q/k/v GEMM per explicit attention (``attention.py``), conv+bias(+add)+ReLU fused
(``fusion.py``), a cast, channels_last and ``torch.compile``.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from sparsify.deploy.attention import fuse_attention_projections_
from sparsify.deploy.fold_bn import check_plain, fold_batchnorm
from sparsify.deploy.fusion import fuse_conv_activations
from sparsify.deploy.stem import space_to_depth_stems_
from sparsify.errors import SparsifyError, TraceError

__all__ = ["deploy"]


def deploy(model: nn.Module, example_inputs: Any, *, fold_bn: bool = True, fuse_activations: bool = True,
           space_to_depth_stem: bool = False, channels_last: bool = True, compile: bool = False,
           dtype: torch.dtype | None = None, inplace: bool = False, merge_residual_bias: bool = True,
           fuse_attention: bool = True) -> nn.Module:
    """A copy of ``model`` ready for inference (the model itself with ``inplace=True``).

    Eval mode; eval-mode BatchNorms folded into the preceding convs (``fold_bn``, see
    :func:`fold_batchnorm`); conv→ReLU/ReLU6 and conv→add→ReLU fused for eager CUDA inference into
    cuDNN's one-kernel conv+bias(+add)+ReLU (``fuse_activations``, see :mod:`sparsify.deploy.fusion`;
    the returned module lists them in ``.sparsify_fusions``; skipped with ``compile``, where inductor
    fuses by itself; ``merge_residual_bias``: the bias of a conv whose output is only the residual of a fused
    add moves into the fused conv, one elementwise kernel fewer per ResNet downsample block); parameters
    cast to ``dtype`` if given; 4-d weights in channels_last memory format (``channels_last``: feed
    channels_last inputs too, or leave it to autocast); ``torch.compile``d if ``compile`` (the returned
    module is then the compiled wrapper). The outputs equal the original's up to floating-point rounding
    (on the CPU, fusion without ``merge_residual_bias`` changes nothing).

    Where a fusion needs a rewritten forward (a residual add, a ReLU module called twice, a functional
    ReLU: torchvision's ResNets), the result is a ``torch.fx.GraphModule`` of the eval-mode trace that
    shares the parameters; with ``inplace=True`` the model itself is then folded but not fused.

    ``space_to_depth_stem``: stride-2 convs on at most 4 input channels (the stem) become
    :class:`sparsify.nn.SpaceToDepthConv2d` (a stride-1 conv on the 2×2 space-to-depth input, aligned
    channels; exact up to rounding) after folding — on an H100 this turns ResNet-50's 1.5 ms stem into a
    tensor-core conv; the stem's own activation is then not fused.

    ``fuse_attention``: every :class:`sparsify.nn.ExplicitMultiheadAttention` (swapped in to prune heads)
    projects q, k and v with one GEMM (:mod:`sparsify.deploy.attention`); listed in ``.sparsify_attention``.
    """
    if not isinstance(model, nn.Module):
        raise SparsifyError(f"deploy() expects an nn.Module, got {type(model).__name__}")
    check_plain(model)
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise SparsifyError(f"dtype must be a floating-point torch.dtype (e.g. torch.bfloat16), got {dtype!r}")
    out = model if inplace else copy.deepcopy(model)
    out.eval()
    if fold_bn:
        fold_batchnorm(out, example_inputs)
    if space_to_depth_stem:
        space_to_depth_stems_(out)
    fused_attention = fuse_attention_projections_(out) if fuse_attention else []
    if fuse_activations and not compile:
        try:
            out, fusions = fuse_conv_activations(out, example_inputs, merge_residual_bias=merge_residual_bias)
        except TraceError:  # only with fold_bn=False (folding traces too): an untraceable model stays unfused
            fusions = []
        out.sparsify_fusions = fusions
    out.sparsify_attention = fused_attention
    if dtype is not None:
        out.to(dtype)
    if channels_last:
        out.to(memory_format=torch.channels_last)
    if compile:
        out = torch.compile(out)
    return out
