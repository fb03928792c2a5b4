"""The demo's training and evaluation: SGD by parameter role, warmup + cosine LR, a simple augmentation,
eval-mode prediction, and CPU latency through :func:`sparsify.measure.measure_latency`."""

from __future__ import annotations

import functools
import math
import statistics
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import Progress
from torch import nn

from sparsify.adapters.base import original
from sparsify.cli.demo.config import DemoConfig
from sparsify.cli.demo.data import Data
from sparsify.measure import measure_latency

__all__ = ["accuracy", "latencies_ms", "make_optimizer", "predict", "train"]

_BN = nn.modules.batchnorm._BatchNorm


def make_optimizer(model: nn.Module, config: DemoConfig, thresholds: Sequence[nn.Parameter] = (),
                   bn_weight_decay: float | None = None) -> torch.optim.SGD:
    """SGD with parameter groups by role: conv/linear weights, BN γ/β̂, STR thresholds (no optimizer decay)."""
    thr = {id(p) for p in thresholds}
    bn = {id(original(m, n)) for m in model.modules() if isinstance(m, _BN) for n in ("weight", "bias")
          if getattr(m, n, None) is not None}
    weights = [p for p in model.parameters() if id(p) not in thr and id(p) not in bn]
    bn_params = [p for p in model.parameters() if id(p) in bn]
    groups = [{"params": weights, "weight_decay": config.weight_decay, "role": "weights"},
              {"params": bn_params, "role": "bn",
               "weight_decay": config.bn_weight_decay if bn_weight_decay is None else bn_weight_decay}]
    if thresholds:
        groups.append({"params": list(thresholds), "weight_decay": 0.0, "role": "thresholds"})
    return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum)


def warmup_cosine(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """LR factor: linear warmup, then cosine to 0."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        t = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))
    return factor


def batches(n: int, batch_size: int, generator: torch.Generator, limit: int | None = None) -> list[torch.Tensor]:
    """Shuffled index batches of one epoch (the last partial batch is dropped when there are full ones)."""
    perm = torch.randperm(n, generator=generator)
    out = [perm[i:i + batch_size] for i in range(0, n, batch_size)]
    if len(out) > 1 and len(out[-1]) < batch_size:
        out = out[:-1]
    return out[:limit] if limit is not None else out


def augment(x: torch.Tensor, generator: torch.Generator, flip: bool) -> torch.Tensor:
    """Random translation by up to 1/8 of the image (zero padding), and horizontal flips if ``flip``."""
    n, _, h, w = x.shape
    pad = max(1, h // 8)
    padded = F.pad(x, (pad, pad, pad, pad))
    dy, dx = torch.randint(0, 2 * pad + 1, (2,), generator=generator).tolist()
    x = padded[:, :, dy:dy + h, dx:dx + w]
    if flip:
        mask = torch.rand(n, generator=generator) < 0.5
        x = torch.where(mask[:, None, None, None], x.flip(3), x)
    return x


@torch.inference_mode()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Eval-mode logits for all of ``x``."""
    was_training = model.training
    model.eval()
    try:
        return torch.cat([model(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])
    finally:
        model.train(was_training)


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return float((logits.argmax(1) == y).double().mean())


def train(model: nn.Module, optimizer: torch.optim.Optimizer, data: Data, epochs: int, config: DemoConfig,
          progress: Progress, label: str, *, sparsifier: Any = None, warmup: bool = True) -> list[dict[str, float]]:
    """Train for ``epochs`` with a cosine LR from each group's ``initial_lr`` (``lr`` if unset) to 0, after a
    1-epoch linear warmup if ``warmup``. Returns the per-epoch history."""
    gen = torch.Generator().manual_seed(config.seed)
    per_epoch = len(batches(len(data.x_train), config.batch_size, gen, config.max_steps_per_epoch))
    total = per_epoch * epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total, per_epoch if warmup else 0))
    flip = data.name == "cifar10"
    task = progress.add_task(label, total=total, info="")
    history: list[dict[str, float]] = []
    model.train()
    for epoch in range(epochs):
        loss_sum, seen = 0.0, 0
        for idx in batches(len(data.x_train), config.batch_size, gen, config.max_steps_per_epoch):
            x = augment(data.x_train[idx], gen, flip)
            loss = F.cross_entropy(model(x), data.y_train[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            if sparsifier is not None:
                sparsifier.step()
            loss_sum += float(loss.detach()) * len(idx)
            seen += len(idx)
            progress.advance(task)
        row = {"epoch": epoch + 1, "loss": loss_sum / max(seen, 1),
               "test_acc": accuracy(predict(model, data.x_test), data.y_test)}
        info = f"loss {row['loss']:.3f}  test acc {row['test_acc']:.2%}"
        if sparsifier is not None:
            rep = sparsifier.report()
            row["channel_sparsity"] = rep.channel_sparsity
            row["mean_threshold"] = float(np.mean(list(rep.thresholds.values()))) if rep.thresholds else 0.0
            info += f"  channel sparsity {rep.channel_sparsity:.1%}"
        history.append(row)
        progress.update(task, info=f"epoch {epoch + 1}/{epochs}  {info}")
    return history


def latencies_ms(models: Sequence[nn.Module], x: torch.Tensor, repeats: int, warmup: int = 3) -> list[float]:
    """Median CPU latency (ms) of ``model(x)`` per model, in eval mode under ``inference_mode``, timed by
    :func:`sparsify.measure.measure_latency`. The models take turns, one call each per round, so that load
    from other processes hits them alike."""
    calls = [functools.partial(m, x) for m in models]
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        with torch.inference_mode():
            for _ in range(warmup):
                for call in calls:
                    call()
            rounds = [[measure_latency(call, iters=1, warmup=0)[0] for call in calls] for _ in range(repeats)]
    finally:
        for m, mode in zip(models, modes, strict=True):
            m.train(mode)
    return [statistics.median(times) for times in zip(*rounds, strict=True)]
