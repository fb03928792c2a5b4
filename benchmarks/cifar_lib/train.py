"""The training loop shared by every arm: one cosine schedule, bf16 autocast, channels_last, and
the forward+backward captured in a CUDA graph (re-captured after pruning) when on a GPU."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from benchmarks.cifar_lib.data import DeviceLoader


@dataclass
class Recipe:
    epochs: int = 40
    prune_epoch: int = 30  # pruning arms remove structures after this many epochs, then keep training
    batch: int = 256
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: float = 1.0


def lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    """Linear warm-up, then cosine to zero."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))


class CachedForward(nn.Module):
    """The model's forward inside a parametrization cache (``enter()``: ``Sparsifier.cached`` or
    ``parametrize.cached``), entered *inside* the forward so that a CUDA graph captures the batched
    transform and every graph replay recomputes it."""

    def __init__(self, model: nn.Module, enter: Callable[[], Any]) -> None:
        super().__init__()
        self.model = model
        self.enter = enter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with self.enter():
            return self.model(x)


class Trainer:
    """Owns the model's optimizer and its training forward: CUDA-graphed on one GPU, wrapped in
    DistributedDataParallel when ``ddp`` (then eager); ``rebuild()`` after pruning."""

    def __init__(self, model: nn.Module, recipe: Recipe, device: torch.device, bf16: bool, graphs: bool,
                 ddp: bool = False, cache: Callable[[], Any] = parametrize.cached) -> None:
        self.model, self.recipe, self.device = model, recipe, device
        self.step_module = CachedForward(model, cache)
        self.bf16, self.graphs, self.ddp = bf16, graphs and device.type == "cuda" and not ddp, ddp
        self.graphed = False
        self.capture_error = ""
        self.net: nn.Module = self.step_module  # what the training step calls

    def rebuild(self, example: torch.Tensor) -> None:
        """(Re)create the optimizer and capture the forward/backward for the model's current shapes."""
        self.ungraph()
        r = self.recipe
        fused = {"fused": True} if self.device.type == "cuda" else {}
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=r.lr, momentum=r.momentum, nesterov=True,
                                         weight_decay=r.weight_decay, **fused)
        if self.ddp:  # a new wrapper: the old reducer holds the parameters from before pruning
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = torch.nn.parallel.DistributedDataParallel(self.step_module, device_ids=ids)
        if self.graphs:
            self.model.train()
            for p in self.model.parameters():  # graphed backward + AccumulateGrad into a missing .grad
                if p.requires_grad:            # gives wrong gradients from the 3rd step on (torch 2.11)
                    p.grad = torch.zeros_like(p)
            try:
                with self._autocast():
                    torch.cuda.make_graphed_callables(self.step_module, (example,), num_warmup_iters=3)
            except RuntimeError as exc:  # recorded in the run's JSON; the arm goes on eagerly (slower)
                self.capture_error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                print(f"CUDA graph capture failed, training eagerly: {self.capture_error}", flush=True)
                self.graphs = False
                self.ungraph()
                return
            self.graphed = True

    def ungraph(self) -> None:
        """Back to the eager forward (before pruning or tracing: the graph holds the old tensors)."""
        if self.graphed:
            self.step_module.__dict__.pop("forward", None)
            self.graphed = False
        self.net = self.step_module

    def _autocast(self) -> Any:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16, cache_enabled=False)

    def train_epoch(self, loader: DeviceLoader, step: int, total_steps: int, arm: Any) -> tuple[int, dict]:
        self.model.train()
        r = self.recipe
        warmup = int(r.warmup_epochs * len(loader))
        loss_sum = torch.zeros((), device=self.device)
        _sync(self.device)
        start = time.perf_counter()
        for x, y in loader:
            for group in self.optimizer.param_groups:
                group["lr"] = lr_at(step, total_steps, warmup, r.lr)
            with self._autocast():  # step_module: each parametrized tensor once per forward (batched)
                logits = self.net(x)
            loss = F.cross_entropy(logits.float(), y)
            self.optimizer.zero_grad(set_to_none=False)
            loss.backward()
            arm.after_backward()
            self.optimizer.step()
            step += 1
            arm.after_step(step)
            loss_sum += loss.detach()
        _sync(self.device)
        seconds = time.perf_counter() - start
        images = len(loader) * loader.batch  # the global batch: all ranks together
        return step, {"loss": float(loss_sum) / len(loader), "seconds": seconds, "images_per_s": images / seconds}

    @torch.no_grad()
    def evaluate(self, loader: DeviceLoader) -> float:
        self.model.eval()
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        for x, y in loader:
            with self._autocast():
                correct += (self.model(x).argmax(1) == y).sum()
        return float(correct) / len(loader.y)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
