"""Inference latency of a (pruned) network as deployed: BN folded, activations fused, bf16, channels_last."""

from __future__ import annotations

import statistics

import torch
from torch import nn

from sparsify.deploy import deploy
from sparsify.measure import measure_latency

LATENCY_BATCH = 256


def deployed_latency_ms(model: nn.Module, images: torch.Tensor, *, batch: int = LATENCY_BATCH, iters: int = 50,
                        warmup: int = 10) -> float:
    """Median milliseconds per forward of ``batch`` images through ``sparsify.deploy.deploy(model)``
    (bf16 weights and autocast on CUDA, fp32 elsewhere; channels_last), without gradients.
    ``images``: normalised inputs on the model's device (repeated up to ``batch``)."""
    device = images.device
    dtype = torch.bfloat16 if device.type == "cuda" else None
    x = images.repeat((batch + len(images) - 1) // len(images), 1, 1, 1)[:batch]
    x = x.to(memory_format=torch.channels_last, dtype=dtype or x.dtype)
    deployed = deploy(model, images[:2], dtype=dtype, channels_last=True)
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype is not None):
        times = measure_latency(lambda: deployed(x), iters=iters, warmup=warmup, device=device)
    return statistics.median(times)
