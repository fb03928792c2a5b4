"""Re-estimate BatchNorm running statistics after the network changed under them.

Pruning, or a last threshold shift before it (``STRConfig(target=…)``, ``slimming``'s global
threshold), changes the activations that the following BatchNorm layers normalise; their running
mean and variance, estimated during training, are then stale and an ``eval()`` model can lose most
of its accuracy although the weights are fine. A few hundred training images through the model in
train mode, without gradients, give fresh statistics (the "adaptive BN" of EagleEye, Li et al. 2020).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable

import torch
from torch import nn

from sparsify.errors import SparsifyError

__all__ = ["recalibrate_batchnorm"]


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Iterable[torch.Tensor], max_batches: int | None = None) -> int:
    """Reset every BatchNorm's running statistics and re-estimate them as the plain average over
    ``batches`` (inputs only), in train mode without gradients; the model's mode and each layer's
    momentum are restored. Returns the number of batches used."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        raise SparsifyError("recalibrate_batchnorm: the model has no BatchNorm layer that tracks running statistics")
    iterator = iter(batches)
    first = next(iterator, None)
    if first is None or max_batches == 0:  # checked before anything is reset: bad input leaves the model as it was
        raise SparsifyError("recalibrate_batchnorm: `batches` gave no batch; pass an iterable of input tensors "
                            "(and max_batches ≥ 1)")
    was_training = model.training
    momenta = [m.momentum for m in norms]
    used = 0
    try:
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative moving average: every batch counts the same
        model.train()
        for x in itertools.chain([first], iterator):
            if max_batches is not None and used >= max_batches:
                break
            model(x)
            used += 1
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        model.train(was_training)
    return used
