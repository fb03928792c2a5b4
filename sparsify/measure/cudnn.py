"""cuDNN's algorithm choice for a deployment: its autotuner (``cudnn.benchmark``) or its heuristics.

The autotuner times every candidate kernel once per new input shape and keeps the fastest. At large batches
that pays; at small ones every kernel runs for microseconds, so one noisy timing decides, and the pick can be
both slower and different from process to process. Measured on an H200 (bf16, channels_last, CUDA graphs,
MobileNetV2 at batch 1, fresh processes): dense autotuned 0.43–0.49 ms in four, heuristics 0.376 ms in both
of two; the same network pruned 2× (round_to 16) autotuned 0.42–0.52 ms (once 0.83× dense), heuristics
0.36 ms (1.04× dense) both times. So time and serve small batches with the heuristics::

    with cudnn_autotune(batch >= 64):
        model(x)

PyTorch keeps one plan per shape in a process whichever way it was chosen, so the first call at a shape
decides: switch before a shape's first call, not after.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["cudnn_autotune"]


@contextlib.contextmanager
def cudnn_autotune(enabled: bool) -> Iterator[None]:
    """Inside the block, cuDNN picks kernels by timing them (``enabled``) or by its heuristics; the flag the
    caller had is restored afterwards, whatever happens inside."""
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = bool(enabled)
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before
