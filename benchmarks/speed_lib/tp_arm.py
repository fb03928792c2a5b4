"""Torch-Pruning's arms (``tp``, ``tp+round``): ``MetaPruner`` + ``GroupMagnitudeImportance``, a uniform
``pruning_ratio`` searched to the same MACs target; the classifier (ViT: all but the MLP hidden layers) ignored."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from benchmarks.speed_lib.models import WeightMacs, tp_ignored
from sparsify._compat import import_torchvision

import_torchvision()  # before torch_pruning: it imports torchvision
import torch_pruning as tp  # noqa: E402


def prune_tp(name: str, dense: nn.Module, x: torch.Tensor, ratio: float, round_to: int | None, p: int,
             steps: int, refine: int) -> tuple[nn.Module, dict[str, Any]]:
    """TP's iterative pruning (``steps`` steps up to ratio 0.95) until the MACs target is met, then
    ``refine`` bisection steps on ``pruning_ratio`` between the last two step ratios (one-shot each)."""
    counter = WeightMacs(dense, x)
    top = 0.95

    def pruner(r: float, iterative: int) -> tuple[nn.Module, Any]:
        model = copy.deepcopy(dense)
        return model, tp.pruner.MetaPruner(
            model, x, importance=tp.importance.GroupMagnitudeImportance(p=p), pruning_ratio=r,
            iterative_steps=iterative, ignored_layers=tp_ignored(name, model), round_to=round_to,
            in_channel_groups={}, out_channel_groups={}, num_heads={})

    model, pr = pruner(top, steps)
    lo = hi = top
    for k in range(1, steps + 1):
        pr.step()
        if counter.reduction(model) >= ratio:
            lo, hi = top * (k - 1) / steps, top * k / steps
            break
    for _ in range(refine if lo < hi else 0):  # TP's widths with round_to are not monotone in the ratio
        mid = 0.5 * (lo + hi)
        candidate, pr = pruner(mid, 1)
        pr.step()
        if counter.reduction(candidate) >= ratio:
            hi, model = mid, candidate
        else:
            lo = mid
    return model.eval(), {"tp_pruning_ratio": round(hi, 5)}


def tp_version() -> str:
    return getattr(tp, "__version__", "?")
