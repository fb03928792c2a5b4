"""The compared methods. Each arm hooks the shared training loop and prunes at the prune epoch to
an exact MACs target (MACs counted by sparsify for every arm, Torch-Pruning's included)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from sparsify import FilterNormConfig, GMPConfig, SlimmingConfig, Sparsifier, STRConfig
from sparsify.graph.cost import module_macs
from sparsify.graph.trace import trace


def macs_of(model: nn.Module, example: torch.Tensor) -> int:
    return sum(module_macs(trace(model, example[:1])).values())


class Arm:
    """Default: dense training, nothing pruned."""

    name = "dense"
    graphs = True  # the forward/backward may be captured in a CUDA graph

    def __init__(self, ratio: float, steps_per_epoch: int, prune_epoch: int, seed: int, ramp_end: float = 0.6) -> None:
        self.ratio, self.steps_per_epoch, self.prune_epoch, self.seed = ratio, steps_per_epoch, prune_epoch, seed
        self.ramp_end = ramp_end
        self.prune_step = steps_per_epoch * prune_epoch
        self.info: dict[str, Any] = {}

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


class STRBN(Arm):
    """Ours: STR on BN γ with learned per-layer thresholds; the budget controller (one common threshold
    shift, 4 times an epoch) follows a cubic schedule to the MACs target by 60 % of the sparse phase
    and holds it; prune() brings the soft model to the target exactly, then removes its zeros."""

    name = "str_bn"

    def setup(self, model: nn.Module, example: torch.Tensor) -> None:
        cfg = STRConfig(s_init=-6.0, threshold_fn="exp", target=self.fraction, target_unit="macs",
                        target_start_step=self.ramp[0], target_end_step=self.ramp[1],
                        control_every=max(1, self.steps_per_epoch // 4))
        self.sp = Sparsifier(model, example[:2], "bn_gamma", cfg)

    def after_step(self, step: int) -> None:
        if step <= self.prune_step:
            self.sp.step()

    def prune(self, model: nn.Module, example: torch.Tensor) -> None:
        self.info["soft_macs_removed_before_final_shift"] = self.sp.policy.measured_sparsity()
        self.info["thresholds"] = self.sp.policy.thresholds()
        self.sp.prune()


class GMPERK(Arm):
    """Ours: gradual magnitude pruning of filter norms, cubic schedule, ERK budget over MACs (exact)."""

    name = "gmp_erk"

    def setup(self, model: nn.Module, example: torch.Tensor) -> None:
        cfg = GMPConfig(sparsity=self.fraction, unit="macs", budget="erk", start_step=self.ramp[0],
                        end_step=self.ramp[1], update_every=max(self.steps_per_epoch // 2, 1))
        self.sp = Sparsifier(model, example[:2], FilterNormConfig(p=2), cfg)

    def after_step(self, step: int) -> None:
        if step <= self.prune_step:
            self.sp.step()

    def prune(self, model: nn.Module, example: torch.Tensor) -> None:
        self.sp.prune()


class Slimming(Arm):
    """Network Slimming: L1 on γ during the sparse phase, one global γ threshold to the MACs target."""

    name = "slimming"
    l1 = 1e-5  # the paper's value for ResNets (1e-4 for VGG)

    def setup(self, model: nn.Module, example: torch.Tensor) -> None:
        cfg = SlimmingConfig(l1=self.l1, sparsity=self.fraction, unit="macs", budget="global")
        self.sp = Sparsifier(model, example[:2], "bn_gamma", cfg)

    def prune(self, model: nn.Module, example: torch.Tensor) -> None:
        self.sp.prune()


class L1OneShot(Arm):
    """Li et al.: dense training, then one-shot removal of the smallest-L1 filters, the same fraction
    in every layer (uniform), then fine-tuning."""

    name = "l1"

    def prune(self, model: nn.Module, example: torch.Tensor) -> None:
        cfg = GMPConfig(sparsity=self.fraction, unit="macs", budget="uniform", start_step=0, end_step=1)
        sp = Sparsifier(model, example[:2], FilterNormConfig(p=1), cfg)
        sp.policy.update(self.fraction)
        sp.prune()


class TorchPruning(Arm):
    """Torch-Pruning's sparse-learning pruner (GroupNormPruner, DepGraph), its CIFAR recipe scaled:
    group regularisation (reg 5e-4) during the sparse phase, then global group pruning in small
    steps until the MACs target, then fine-tuning."""

    name = "torch_pruning"

    def setup(self, model: nn.Module, example: torch.Tensor) -> None:
        import torch_pruning as tp

        self.tp = tp
        self.model = model
        self.pruner = tp.pruner.GroupNormPruner(
            model, example[:2], importance=tp.importance.GroupMagnitudeImportance(p=2), reg=5e-4,
            global_pruning=True, pruning_ratio=1.0, iterative_steps=400, ignored_layers=[_classifier(model)],
            in_channel_groups={}, out_channel_groups={}, num_heads={})
        # TP's nodes keep the autograd graph of its tracing forward alive, and with it the parameters'
        # gradient accumulators, created on the legacy stream: CUDA-graph capture of the training step
        # then fails ("legacy stream depend on a capturing blocking stream"). Pruning needs only the
        # dependencies it derived, so drop the grad_fn references and let that graph go.
        for node in self.pruner.DG.module2node.values():
            node.grad_fn = None

    #: regularize() every this many steps with reg scaled by it (the same total push): TP's regularize()
    #: costs ~0.3 s of host time per step on the H100 machine (it synchronizes once per group), which makes
    #: a 40-epoch run ~40 minutes. Set by ``--tp-reg-every``; recorded in the JSON.
    reg_every = 1

    def after_backward(self) -> None:
        if self.info.get("pruned"):  # sparse learning happens before pruning only
            return
        self.calls = getattr(self, "calls", 0) + 1
        if self.calls % self.reg_every == 0:
            self.pruner.reg = 5e-4 * self.reg_every
            self.pruner.regularize(self.model)

    def prune(self, model: nn.Module, example: torch.Tensor) -> None:
        x = example[:1]
        base = macs_of(model, x)
        steps = 0
        while macs_of(model, x) > base / self.ratio and steps < 400:
            self.pruner.step()
            steps += 1
        self.info["tp_steps"] = steps
        self.info["pruned"] = True


def _classifier(model: nn.Module) -> nn.Linear:
    """The last Linear layer (the classifier, which keeps its outputs)."""
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1]


ARMS: dict[str, type[Arm]] = {a.name: a for a in (Arm, STRBN, GMPERK, Slimming, L1OneShot, TorchPruning)}

