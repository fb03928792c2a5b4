"""Fold eval-mode BatchNorms into the convolutions before them, where that is exact (a step of ``deploy``).

Conv→BN pairs are found on the traced graph (``sparsify.graph.trace``), so any fx-traceable model is
handled, not only ``nn.Sequential`` chains. A pair is folded only when that is exact for every use:

* the BN's only input is the conv's output, and the conv's output feeds nothing but the BN;
* the conv and the BN are each called once, registered under one name, and their tensors are not read
  elsewhere in the graph (a conv used twice would see the folded weights in its other call);
* the BN uses running statistics in eval mode (``track_running_stats``).

The fold itself is ``torch.nn.utils.fusion.fuse_conv_bn_eval``; the BN is replaced by ``nn.Identity``.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.fusion import fuse_conv_bn_eval

from sparsify._utils import set_submodule
from sparsify.errors import SparsifyError
from sparsify.graph.fusable import foldable_bn_pairs
from sparsify.graph.trace import trace

__all__ = ["find_conv_bn_pairs", "fold_batchnorm"]


def check_plain(model: nn.Module) -> None:
    """Refuse a model that still carries a policy's parametrizations (masks, thresholds)."""
    names = [name for name, m in model.named_modules() if parametrize.is_parametrized(m)]
    if names:
        raise SparsifyError(
            f"{len(names)} modules still carry parametrizations (e.g. '{names[0]}'): the model is still being "
            "sparsified. Call Sparsifier.prune() first (it bakes the masks/thresholds into the weights), then deploy.")


def find_conv_bn_pairs(model: nn.Module, example_inputs: Any) -> tuple[list[tuple[str, str]], dict[str, str]]:
    """Conv→BN pairs of ``model`` that can be folded exactly, and for other BNs after a conv, why not.

    Returns ``([(conv name, bn name), ...], {bn name: reason})``.
    """
    return foldable_bn_pairs(trace(model, example_inputs))


def fold_batchnorm(model: nn.Module, example_inputs: Any) -> list[tuple[str, str]]:
    """Fold every exactly foldable eval-mode BatchNorm into the conv before it, in place.

    The conv gets the folded weight and bias; the BN becomes ``nn.Identity``. Returns the folded
    ``(conv name, bn name)`` pairs. The model is switched to eval mode.
    """
    check_plain(model)
    model.eval()
    pairs, _ = find_conv_bn_pairs(model, example_inputs)
    for conv_name, bn_name in pairs:
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        set_submodule(model, conv_name, fuse_conv_bn_eval(conv, bn, transpose=bool(conv.transposed)))
        set_submodule(model, bn_name, nn.Identity())
    return pairs
