"""The measured latency of a whole network, run eagerly as given (eval, no grad, channels_last, autocast).

``network_latency(model, inputs, batch=256, device="cuda", dtype=torch.bfloat16)`` moves a model (a copy
is the caller's business) and its example inputs to ``device``, repeats the inputs along the batch dim to
``batch`` examples, and times ``model(*inputs)`` with :func:`sparsify.measure.bench.benchmark`. It is the
default whole-network measurement of ``GMPConfig(budget="latency", target_speedup=...)``; a deployed
network (BN folded, conv+bias+ReLU fused, compiled) is measured by passing ``LatencyModel(...,
measure=fn)`` where ``fn(pruned_model) -> ms`` deploys and times it, e.g. with ``sparsify.deploy.deploy``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map

from sparsify.measure.bench import Timing, benchmark
from sparsify.measure.timing import autocast_context

__all__ = ["batched_inputs", "network_latency"]


def batched_inputs(inputs: Any, batch: int, device: torch.device, channels_last: bool = True) -> Any:
    """``inputs`` with every tensor's first dim repeated (or cut) to ``batch`` examples, on ``device``;
    4-d float tensors in channels_last when ``channels_last``."""
    if batch < 1:
        raise ValueError(f"batch must be ≥ 1, got {batch}")

    def grow(x: Any) -> Any:
        if not isinstance(x, torch.Tensor) or x.ndim == 0 or x.shape[0] == 0:
            return x
        reps = -(-batch // x.shape[0])
        y = x.detach().repeat(reps, *([1] * (x.ndim - 1)))[:batch].to(device)
        if channels_last and y.ndim == 4 and y.is_floating_point():
            y = y.contiguous(memory_format=torch.channels_last)
        return y

    return tree_map(grow, inputs)


def network_latency(model: nn.Module, inputs: Sequence[Any], *, batch: int, device: torch.device | str = "cpu",
                    dtype: torch.dtype | None = None, channels_last: bool = True, **bench: Any) -> Timing:
    """Timing of ``model(*inputs)`` with ``inputs`` grown to ``batch`` examples (``bench``: :func:`benchmark` options).

    The model is put in eval mode and moved to ``device`` (channels_last with ``channels_last``) in place.
    """
    device = torch.device(device)
    model.eval().to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    args = tuple(batched_inputs(list(inputs), batch, device, channels_last))

    def call() -> None:
        with torch.no_grad(), autocast_context(device, dtype):
            model(*args)

    return benchmark(call, device=device, **bench)
