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


def _check_arguments(batches: Iterable[torch.Tensor], max_batches: int | None) -> None:
    if max_batches is not None and (isinstance(max_batches, bool) or not isinstance(max_batches, int)
                                    or max_batches < 1):
        raise SparsifyError(f"recalibrate_batchnorm: max_batches must be a positive int or None (every batch), got "
                            f"{max_batches!r}")
    if isinstance(batches, torch.Tensor):
        raise SparsifyError(f"recalibrate_batchnorm: `batches` is one tensor of shape {tuple(batches.shape)}; "
                            "iterating it would feed its rows one by one. Pass an iterable of input batches, e.g. [x], "
                            "x.split(64) or (x for x, _ in loader)")


def _statistics(norms: list[nn.Module]) -> list[dict[str, torch.Tensor]]:
    return [{k: getattr(m, k).clone() for k in ("running_mean", "running_var", "num_batches_tracked")
             if getattr(m, k, None) is not None} for m in norms]


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Iterable[torch.Tensor], max_batches: int | None = None) -> int:
    """Reset every BatchNorm's running statistics and re-estimate them as the plain average over
    ``batches`` (inputs only, each passed as ``model(batch)``), in train mode without gradients; the model's
    modes and each layer's momentum are restored. Returns the number of batches used. If a batch fails, the
    old statistics are put back and the error says which batch."""
    _check_arguments(batches, max_batches)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        raise SparsifyError("recalibrate_batchnorm: the model has no BatchNorm layer that tracks running statistics")
    iterator = iter(batches)
    first = next(iterator, None)
    if first is None:  # checked before anything is reset: bad input leaves the model as it was
        raise SparsifyError("recalibrate_batchnorm: `batches` gave no batch; pass an iterable of input tensors "
                            "(and max_batches ≥ 1)")
    modes = {m: m.training for m in model.modules()}
    momenta = [m.momentum for m in norms]
    saved = _statistics(norms)
    used, x = 0, first
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
    except Exception as exc:
        for m, stats in zip(norms, saved, strict=True):
            for k, v in stats.items():
                getattr(m, k).copy_(v)
        pair = " (a (input, target) pair? pass (x for x, _ in loader))" if isinstance(x, (tuple, list)) else ""
        raise SparsifyError(f"recalibrate_batchnorm: model(batch) failed on batch {used}{pair}: {type(exc).__name__}: "
                            f"{exc}. The running statistics were put back; pass batches the model's forward accepts "
                            "in train mode (BatchNorm needs more than one value per channel)") from exc
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        for m, mode in modes.items():
            m.training = mode
    return used
