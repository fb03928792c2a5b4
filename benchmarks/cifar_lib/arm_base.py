"""What every compared method shares: the hooks into the training loop, the MACs count, the target check."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from sparsify.graph.cost import module_macs
from sparsify.graph.trace import trace

#: a pruned network meets its target when its MACs reduction is within this relative distance of it
TARGET_TOLERANCE = 0.03


def macs_of(model: nn.Module, example: torch.Tensor) -> int:
    """MACs per image as sparsify counts them (the same count for every arm, Torch-Pruning's included)."""
    return sum(module_macs(trace(model, example[:1])).values())


def target_met(reduction: float, ratio: float) -> bool:
    """Whether ``reduction``× fewer MACs hits a ``ratio``× target within :data:`TARGET_TOLERANCE`."""
    return abs(reduction / ratio - 1.0) <= TARGET_TOLERANCE


class Arm:
    """Default: dense training, nothing pruned."""

    name = "dense"
    prunes = False  # removes structures at its prune epoch
    prune_at_start = False  # prunes before the first epoch (one-shot methods in the protocol mode)
    graphs = True  # the forward/backward may be captured in a CUDA graph

    def __init__(self, ratio: float, steps_per_epoch: int, prune_epoch: int, seed: int, ramp_end: float = 0.6,
                 round_to: int | None = None) -> None:
        self.ratio, self.steps_per_epoch, self.prune_epoch, self.seed = ratio, steps_per_epoch, prune_epoch, seed
        self.ramp_end, self.round_to = ramp_end, round_to
        self.prune_step = steps_per_epoch * prune_epoch
        self.info: dict[str, Any] = {}
        self.batches: Any = None  # the training loader, set by the harness (for arms that need data to prune)

    @property
    def ramp(self) -> tuple[int, int]:
        """Steps over which the gradual arms bring sparsity from 0 to the target: from the end of
        the first epoch to ``ramp_end`` (60 %) of the sparse phase."""
        start = min(self.steps_per_epoch, self.prune_step // 10)
        return start, max(start + 1, int(self.ramp_end * self.prune_step))

    @property
    def fraction(self) -> float:
        """Fraction of MACs to remove."""
        return 1.0 - 1.0 / self.ratio

    def setup(self, model: nn.Module, example: torch.Tensor) -> None:
        """Before the optimizer is made (policies may add parameters)."""

    def cache(self) -> Any:
        """The context the training forward runs in (the Sparsifier's batched cache when there is one)."""
        sp = getattr(self, "sp", None)
        return sp.cached() if sp is not None and not sp.pruned else parametrize.cached()

    def after_backward(self) -> None:
        """Between backward and the optimizer step."""

    def after_step(self, step: int) -> None:
        """After each optimizer step."""

    def prune(self, model: nn.Module, example: torch.Tensor) -> None:
        """Remove structures at the prune epoch (the model is in eval mode, eager)."""

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint before the prune epoch needs beyond the model and the optimizer."""
        sp = getattr(self, "sp", None)
        return {"sparsifier": sp.state_dict()} if sp is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "sparsifier" in state:
            self.sp.load_state_dict(state["sparsifier"])


class DenseFT(Arm):
    """The protocol's fair baseline: the dense model fine-tuned for the same S+F epochs as every other arm."""

    name = "dense_ft"


def classifier(model: nn.Module) -> nn.Linear:
    """The last Linear layer (the classifier, which keeps its outputs)."""
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
