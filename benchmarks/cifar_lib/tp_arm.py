"""Torch-Pruning's sparse-learning pruner (GroupNormPruner, DepGraph) as an arm of the CIFAR harness."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.cifar_lib.arm_base import Arm, classifier, macs_of

#: --tp-importance: Torch-Pruning's importance criteria. magnitude: GroupMagnitudeImportance(p=2) with its
#: default mean normalizer (this harness's choice before the protocol mode); group_sl: the same with the
#: max normalizer (DepGraph's published group_sl recipe); taylor: GroupTaylorImportance; lamp: LAMPImportance.
TP_IMPORTANCES = ("magnitude", "group_sl", "taylor", "lamp")
TAYLOR_BATCHES = 4  # training batches whose gradients the Taylor importance reads at pruning


def tp_importance(tp: Any, kind: str) -> Any:
    if kind == "magnitude":
        return tp.importance.GroupMagnitudeImportance(p=2)
    if kind == "group_sl":
        return tp.importance.GroupMagnitudeImportance(p=2, normalizer="max")
    if kind == "taylor":
        return tp.importance.GroupTaylorImportance()
    if kind == "lamp":
        return tp.importance.LAMPImportance(p=2)
    raise ValueError(f"unknown Torch-Pruning importance {kind!r}: one of {', '.join(TP_IMPORTANCES)}")


class TorchPruning(Arm):
    """Torch-Pruning's sparse-learning pruner (GroupNormPruner, DepGraph), its CIFAR recipe: group
    regularisation (reg 5e-4) during the sparse phase, then global group pruning in small steps
    (400 steps of its channel schedule) until the MACs target, then fine-tuning."""

    name = "torch_pruning"
    prunes = True
    reg = 5e-4
    #: regularize() every this many steps with reg scaled by it (the same total push): TP's regularize()
    #: costs ~0.3 s of host time per step on the H100 machine (it synchronizes once per group), which makes
    #: a 40-epoch run ~40 minutes. Set by ``--tp-reg-every``; recorded in the JSON.
    reg_every = 1
    importance = "magnitude"  # set by ``--tp-importance``

    def setup(self, model: nn.Module, example: torch.Tensor) -> None:
        import torch_pruning as tp

        self.tp = tp
        self.model = model
        self.info["tp_importance"] = self.importance
        self.pruner = tp.pruner.GroupNormPruner(
            model, example[:2], importance=tp_importance(tp, self.importance), reg=self.reg,
            global_pruning=True, pruning_ratio=1.0, iterative_steps=400, ignored_layers=[classifier(model)],
            in_channel_groups={}, out_channel_groups={}, num_heads={})
        # TP's nodes keep the autograd graph of its tracing forward alive, and with it the parameters'
        # gradient accumulators, created on the legacy stream: CUDA-graph capture of the training step
        # then fails ("legacy stream depend on a capturing blocking stream"). Pruning needs only the
        # dependencies it derived, so drop the grad_fn references and let that graph go.
        for node in self.pruner.DG.module2node.values():
            node.grad_fn = None

    def after_backward(self) -> None:
        if self.info.get("pruned"):  # sparse learning happens before pruning only
            return
        self.calls = getattr(self, "calls", 0) + 1
        if self.calls % self.reg_every == 0:
            self.pruner.reg = self.reg * self.reg_every
            self.pruner.regularize(self.model)

    def _taylor_gradients(self, model: nn.Module) -> None:
        """Fresh gradients of the training loss on a few batches (eval mode: BN statistics untouched)."""
        model.zero_grad(set_to_none=False)
        for i, (x, y) in enumerate(self.batches):
            if i == TAYLOR_BATCHES:
                break
            F.cross_entropy(model(x).float(), y).backward()

    def prune(self, model: nn.Module, example: torch.Tensor) -> None:
        x = example[:1]
        if self.importance == "taylor":
            with torch.enable_grad():
                self._taylor_gradients(model)
        base = macs_of(model, x)
        steps = 0
        while macs_of(model, x) > base / self.ratio and steps < 400:
            self.pruner.step()
            steps += 1
        self.info["tp_steps"] = steps
        self.info["pruned"] = True
        if self.importance == "taylor":
            model.zero_grad(set_to_none=True)
