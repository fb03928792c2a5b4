"""Make a (pruned) model ready for inference: BatchNorm folded into convolutions, channels_last, compiled.

Conv→BN pairs are found on the traced graph (``sparsify.graph.trace``), so any fx-traceable model is
handled, not only ``nn.Sequential`` chains. A pair is folded only when that is exact for every use:

* the BN's only input is the conv's output, and the conv's output feeds nothing but the BN;
* the conv and the BN are each called once, registered under one name, and their tensors are not read
  elsewhere in the graph (a conv used twice would see the folded weights in its other call);
* the BN uses running statistics in eval mode (``track_running_stats``).

The fold itself is ``torch.nn.utils.fusion.fuse_conv_bn_eval``; the BN is replaced by ``nn.Identity``.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.fusion import fuse_conv_bn_eval

from sparsify._utils import set_submodule
from sparsify.deploy.fusion import fuse_conv_activations, module_usage
from sparsify.deploy.stem import space_to_depth_stems_
from sparsify.errors import SparsifyError, TraceError
from sparsify.graph.trace import trace

__all__ = ["deploy", "find_conv_bn_pairs", "fold_batchnorm"]

_BN = nn.modules.batchnorm._BatchNorm
_CONV = nn.modules.conv._ConvNd


def _check_plain(model: nn.Module) -> None:
    names = [name for name, m in model.named_modules() if parametrize.is_parametrized(m)]
    if names:
        raise SparsifyError(
            f"{len(names)} modules still carry parametrizations (e.g. '{names[0]}'): the model is still being "
            "sparsified. Call Sparsifier.prune() first (it bakes the masks/thresholds into the weights), then deploy.")


def find_conv_bn_pairs(model: nn.Module, example_inputs: Any) -> tuple[list[tuple[str, str]], dict[str, str]]:
    """Conv→BN pairs of ``model`` that can be folded exactly, and for other BNs after a conv, why not.

    Returns ``([(conv name, bn name), ...], {bn name: reason})``.
    """
    traced = trace(model, example_inputs)
    gm = traced.graph_module
    calls, read, names_of = module_usage(traced)

    pairs, refused = [], {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(gm.get_submodule(str(node.target)), _BN):
            continue
        bn_name, bn = str(node.target), gm.get_submodule(str(node.target))
        src = node.args[0] if node.args else None
        if not isinstance(src, torch.fx.Node) or src.op != "call_module" or not isinstance(
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


def fold_batchnorm(model: nn.Module, example_inputs: Any) -> list[tuple[str, str]]:
    """Fold every exactly foldable eval-mode BatchNorm into the conv before it, in place.

    The conv gets the folded weight and bias; the BN becomes ``nn.Identity``. Returns the folded
    ``(conv name, bn name)`` pairs. The model is switched to eval mode.
    """
    _check_plain(model)
    model.eval()
    pairs, _ = find_conv_bn_pairs(model, example_inputs)
    for conv_name, bn_name in pairs:
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        set_submodule(model, conv_name, fuse_conv_bn_eval(conv, bn, transpose=bool(conv.transposed)))
        set_submodule(model, bn_name, nn.Identity())
    return pairs


def deploy(model: nn.Module, example_inputs: Any, *, fold_bn: bool = True, fuse_activations: bool = True,
           space_to_depth_stem: bool = False, channels_last: bool = True, compile: bool = False,
           dtype: torch.dtype | None = None, inplace: bool = False) -> nn.Module:
    """A copy of ``model`` ready for inference (the model itself with ``inplace=True``).

    Eval mode; eval-mode BatchNorms folded into the preceding convs (``fold_bn``, see
    :func:`fold_batchnorm`); conv→ReLU/ReLU6 and conv→add→ReLU fused for eager CUDA inference into
    cuDNN's one-kernel conv+bias(+add)+ReLU (``fuse_activations``, see :mod:`sparsify.deploy.fusion`;
    the returned module lists them in ``.sparsify_fusions``; skipped with ``compile``, where inductor
    fuses by itself); parameters cast to ``dtype`` if given; 4-d weights in channels_last memory format
    (``channels_last``: feed channels_last inputs too, or leave it to autocast); ``torch.compile``d if
    ``compile`` (the returned module is then the compiled wrapper). The outputs equal the original's up
    to floating-point rounding (on the CPU, fusion changes nothing).

    Where a fusion needs a rewritten forward (a residual add, a ReLU module called twice, a functional
    ReLU: torchvision's ResNets), the result is a ``torch.fx.GraphModule`` of the eval-mode trace that
    shares the parameters; with ``inplace=True`` the model itself is then folded but not fused.

    ``space_to_depth_stem``: stride-2 convs on at most 4 input channels (the stem) become
    :class:`sparsify.nn.SpaceToDepthConv2d` (a stride-1 conv on the 2×2 space-to-depth input, aligned
    channels; exact up to rounding) after folding — on an H100 this turns ResNet-50's 1.5 ms stem into a
    tensor-core conv; the stem's own activation is then not fused.
    """
    if not isinstance(model, nn.Module):
        raise SparsifyError(f"deploy() expects an nn.Module, got {type(model).__name__}")
    _check_plain(model)
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise SparsifyError(f"dtype must be a floating-point torch.dtype (e.g. torch.bfloat16), got {dtype!r}")
    out = model if inplace else copy.deepcopy(model)
    out.eval()
    if fold_bn:
        fold_batchnorm(out, example_inputs)
    if space_to_depth_stem:
        space_to_depth_stems_(out)
    if fuse_activations and not compile:
        try:
            out, fusions = fuse_conv_activations(out, example_inputs)
        except TraceError:  # only with fold_bn=False (folding traces too): an untraceable model stays unfused
            fusions = []
        out.sparsify_fusions = fusions
    if dtype is not None:
        out.to(dtype)
    if channels_last:
        out.to(memory_format=torch.channels_last)
    if compile:
        out = torch.compile(out)
    return out
