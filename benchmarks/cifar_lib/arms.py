"""The compared methods. Each arm hooks the shared training loop and prunes at its prune epoch to
an exact MACs target (MACs counted by sparsify for every arm, Torch-Pruning's included).

Registered by name in :data:`ARMS`: ``dense`` / ``dense_ft`` (nothing pruned), ``str_bn`` and
``str_filter`` (STR with the MACs-target controller on BN γ / filter norms), ``gmp_<budget>_<bn|filter>``
for the uniform, global and ERK budgets (``gmp_erk`` is ``gmp_erk_filter``, its name before the
protocol mode), ``slimming``, ``l1`` (Li et al., one-shot at the prune epoch), ``l1_oneshot`` (the
same at the start of the phase), ``torch_pruning``, ``kirigami`` (torch-kirigami's one-shot magnitude
workflow, ``benchmarks/cifar_lib/kirigami_arm.py``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from benchmarks.cifar_lib.arm_base import TARGET_TOLERANCE, Arm, DenseFT, macs_of, target_met
from benchmarks.cifar_lib.kirigami_arm import Kirigami
from benchmarks.cifar_lib.tp_arm import TorchPruning
from sparsify import FilterNormConfig, GMPConfig, SlimmingConfig, Sparsifier, SparsifierConfig, STRConfig

__all__ = ["ARMS", "TARGET_TOLERANCE", "macs_of", "target_met"]

ADAPTERS: dict[str, Any] = {"bn": "bn_gamma", "filter": FilterNormConfig(p=2)}


class SparsifierArm(Arm):
    """An arm driven by a :class:`~sparsify.Sparsifier`: ``self.sp`` steps after each optimizer step
    of the sparse phase and prunes at the prune epoch."""

    prunes = True
    adapter: Any = "bn_gamma"

    def make(self, model: nn.Module, example: torch.Tensor, policy: Any) -> None:
        config = SparsifierConfig(adapter=self.adapter, policy=policy, round_to=self.round_to)
        self.sp = Sparsifier(model, example[:2], config=config)
        self.info["round_to"] = self.round_to

    def after_step(self, step: int) -> None:
        if step <= self.prune_step:
            self.sp.step()

    def prune(self, model: nn.Module, example: torch.Tensor) -> None:
        self.sp.prune()


class STRBN(SparsifierArm):
    """Ours: STR on BN γ with learned per-layer thresholds; the budget controller (one common threshold
    shift, 4 times an epoch) follows a cubic schedule to the MACs target by 60 % of the sparse phase
    and holds it; prune() brings the soft model to the target exactly, then removes its zeros."""

    name = "str_bn"

    def setup(self, model: nn.Module, example: torch.Tensor) -> None:
        cfg = STRConfig(s_init=-6.0, threshold_fn="exp", target=self.fraction, target_unit="macs",
                        target_start_step=self.ramp[0], target_end_step=self.ramp[1],
                        control_every=max(1, self.steps_per_epoch // 4))
        self.make(model, example, cfg)

    def prune(self, model: nn.Module, example: torch.Tensor) -> None:
        self.info["soft_macs_removed_before_final_shift"] = self.sp.policy.measured_sparsity()
        self.info["thresholds"] = self.sp.policy.thresholds()
        self.sp.prune()


class STRFilter(STRBN):
    """STR on filter L2 norms (the structure's factor scales every producing tensor), same controller."""

    name = "str_filter"
    adapter = ADAPTERS["filter"]


class GMP(SparsifierArm):
    """Gradual magnitude pruning: cubic schedule to the exact MACs target, split by ``budget``."""

    budget = "erk"

    def setup(self, model: nn.Module, example: torch.Tensor) -> None:
        cfg = GMPConfig(sparsity=self.fraction, unit="macs", budget=self.budget, start_step=self.ramp[0],
                        end_step=self.ramp[1], update_every=max(self.steps_per_epoch // 2, 1))
        self.make(model, example, cfg)


def _gmp(budget: str, on: str, name: str | None = None) -> type[GMP]:
    doc = f"GMP on {'BN γ' if on == 'bn' else 'filter L2 norms'}, {budget} budget over MACs (exact)."
    return type(f"GMP_{budget}_{on}", (GMP,), {"name": name or f"gmp_{budget}_{on}", "budget": budget,
                                                "adapter": ADAPTERS[on], "__doc__": doc})


class Slimming(SparsifierArm):
    """Network Slimming: L1 on γ during the sparse phase, one global γ threshold to the MACs target.
    λ: the paper's per-architecture value (1e-5 for ResNets, 1e-4 for VGG; the harness sets it, or
    ``--slimming-l1``)."""

    name = "slimming"
    l1 = 1e-5

    def setup(self, model: nn.Module, example: torch.Tensor) -> None:
        self.info["slimming_l1"] = self.l1
        self.make(model, example, SlimmingConfig(l1=self.l1, sparsity=self.fraction, unit="macs", budget="global"))

    def after_step(self, step: int) -> None:
        """Slimming's L1 acts in its parametrization's gradient; nothing to step."""


class L1OneShot(Arm):
    """Li et al.: one-shot removal of the smallest-L1 filters, the same fraction in every layer
    (uniform), at the prune epoch of a dense run, then fine-tuning."""

    name = "l1"
    prunes = True

    def prune(self, model: nn.Module, example: torch.Tensor) -> None:
        cfg = GMPConfig(sparsity=self.fraction, unit="macs", budget="uniform", start_step=0, end_step=1)
        sp = Sparsifier(model, example[:2], config=SparsifierConfig(adapter=FilterNormConfig(p=1), policy=cfg,
                                                                    round_to=self.round_to))
        sp.policy.update(self.fraction)
        sp.prune()


class L1OneShotAtStart(L1OneShot):
    """The protocol's Li et al. arm: prune the converged dense model at the start of the phase, then
    fine-tune it for all S+F epochs."""

    name = "l1_oneshot"
    prune_at_start = True


GMP_ARMS = [_gmp(b, on) for on in ("bn", "filter") for b in ("uniform", "global", "erk")]
ARMS: dict[str, type[Arm]] = {a.name: a for a in (Arm, DenseFT, STRBN, STRFilter, *GMP_ARMS, _gmp("erk", "filter",
                                                  "gmp_erk"), Slimming, L1OneShot, L1OneShotAtStart, TorchPruning,
                                                  Kirigami)}
