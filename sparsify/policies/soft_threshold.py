"""``str``: Soft Threshold Reparameterization (Kusupati et al., 2020) on importance vectors.

Effective value sign(v)·relu(|v| − g(s)) with g = sigmoid and a learnable threshold parameter s
per vector (per layer, as in STR) or shared by a group. Weight decay on s (the optimizer's, plus an
optional ``threshold_decay``) raises the threshold over training; the loss pushes back, so layer
budgets are learned. ``s_init`` sets how long training stays effectively dense.

Not an exact identity at the start: attaching STR thresholds every vector by sigmoid(s_init) at once
(0.0067 for the default -5), so the model's outputs move right away (about 1 % relative for BN γ near
1). Evaluate the dense model before creating the Sparsifier; a lower ``s_init`` makes the step smaller.

STR alone sets sparsity only indirectly (``s_init``, weight decay). With ``target`` set, a budget
controller makes it hit a cost target: every ``control_every`` steps it shifts every threshold
parameter by one common δ, the smallest with which the soft model zeroes the *desired* fraction of
MACs (or parameters, channels), where *desired* follows the cubic schedule from 0 at
``target_start_step`` to ``target`` at ``target_end_step`` and is held after it; ``prune()`` brings
it to ``target`` exactly. The controller sets the level, the loss gradient on each layer's ``s``
learns the split (``sparsify/policies/str_target.py``); a vector is not pushed past
``max_vector_sparsity`` zeros. An update reads the vectors at its step and changes the thresholds
``control_lag`` steps later (the same shift, applied to the thresholds as they are then): on a GPU the
host's search runs while the queued steps execute, so training does not wait for it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, model_validator
from torch import nn

from sparsify.policies.allocation import budgets
from sparsify.policies.allocation.str_controller import Snapshot, apply_planned, snapshot, track
from sparsify.policies.base import GroupView, Policy, PolicyConfig, PolicyContext, register_policy
from sparsify.prune.select import Connectivity, Magnitude


class STRConfig(PolicyConfig):
    """Learned soft thresholds on importance vectors (STR; with bn_gamma this is STR-BN).

    Attaching it shrinks every vector by sigmoid(s_init) at once: the outputs change (about 1 % relative
    with the default s_init=-5) before any training step; lower s_init for a smaller change."""

    kind: Literal["str"] = "str"
    s_init: float = Field(-5.0, description="initial threshold parameter; sigmoid(s_init) is the initial threshold")
    threshold_decay: float = Field(
        0.0, ge=0, description="extra L2 decay on s, added to its gradient (on top of the optimizer's weight decay)")
    granularity: Literal["vector", "group"] = Field(
        "vector", description="one threshold per vector (per BN layer, as STR-BN) or one shared by a channel group")
    threshold_fn: Literal["sigmoid", "exp"] = Field(
        "sigmoid", description="g(s): sigmoid as in STR (thresholds below 1), or exp (unbounded: for raw vectors "
                               "larger than 1, or a controller that must push past 1)")
    target: float | None = Field(
        None, gt=0, lt=1, description="fraction of `target_unit` to remove (0.5 = 2x fewer MACs); None: no controller")
    target_unit: Literal["macs", "params", "channels"] = Field("macs", description="what `target` counts")
    target_start_step: int = Field(0, ge=0, description="step at which the controller's desired sparsity leaves 0")
    target_end_step: int = Field(1000, ge=1, description="step at which the desired sparsity reaches `target`")
    control_every: int = Field(
        50, ge=1, description="steps between controller updates (each one copies the vectors to the host once)")
    control_lag: int = Field(
        8, ge=0, description="steps from an update's reading of the vectors to its change of the thresholds (at "
                             "most control_every - 1): on a GPU the host searches while the queued steps run, so "
                             "training never waits for it; 0: read and change at the same step (the host waits)")
    max_vector_sparsity: float = Field(
        0.9, gt=0, le=1, description="the controller never raises the threshold of a vector that already has this "
                                     "fraction of zeros (a common shift would otherwise empty whole layers)")

    @model_validator(mode="after")
    def _check(self) -> STRConfig:
        if self.target is not None and self.target_end_step <= self.target_start_step:
            raise ValueError(f"target_end_step ({self.target_end_step}) must be after target_start_step "
                             f"({self.target_start_step})")
        return self


class SoftThreshold(nn.Module):
    """sign(v)·relu(|v| − g(s)) with a learnable scalar s and g = sigmoid (or exp)."""

    def __init__(self, s_init: float, device: torch.device | None = None, threshold_fn: str = "sigmoid") -> None:
        super().__init__()
        self.s = nn.Parameter(torch.full((1,), float(s_init), device=device))
        self.g = torch.sigmoid if threshold_fn == "sigmoid" else torch.exp

    @property
    def threshold(self) -> torch.Tensor:
        return self.g(self.s)

    def forward(self, raw: torch.Tensor) -> torch.Tensor:
        return _SoftThresholdFn.apply(raw, self.g(self.s).to(raw.dtype))


class _SoftThresholdFn(torch.autograd.Function):
    """sign(v)·relu(|v| − τ) with a hand-written backward: 4 kernels forward and 4 backward instead
    of ~17 for the autograd of clamp/sign/relu (a training step launches this once per vector).
    d/dv = [|v| > τ], d/dτ = −Σ sign(v)·[|v| > τ]·grad."""

    @staticmethod
    def forward(ctx: object, raw: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        eff = raw - torch.clamp(raw, -tau, tau)
        kept_sign = eff.sign()  # sign(v) where kept, 0 where thresholded away
        ctx.save_for_backward(kept_sign)
        ctx.tau_shape = tau.shape
        return eff

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: object, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        (kept_sign,) = ctx.saved_tensors
        signed = grad * kept_sign
        return signed * kept_sign, (-signed).sum_to_size(ctx.tau_shape)


class STRPolicy(Policy):
    config: STRConfig

    def attach(self, groups: Sequence[GroupView], context: PolicyContext) -> None:
        self.groups, self.context = list(groups), context
        self.transforms: list[SoftThreshold] = []
        for group in self.groups:
            shared = None
            for v in group.vectors:
                device = v.raw().device
                if self.config.granularity == "group" and shared is not None:
                    t = shared
                else:
                    t = SoftThreshold(self.config.s_init, device, self.config.threshold_fn)
                    self.transforms.append(t)
                    if self.config.threshold_decay:
                        decay = self.config.threshold_decay
                        t.s.register_hook(lambda g, s=t.s, decay=decay: g + decay * s.detach())
                    shared = t
                v.adapter.install(v, t)

    def batched_effective(self) -> tuple[torch.Tensor, list[int]] | None:
        """Every vector's effective value from one chain of kernels (all raw vectors concatenated and
        thresholded once): the same values as each vector's transform, for the price of one. Returns
        the concatenation and the vectors' lengths; None if the vectors differ in device or dtype."""
        vectors = [v for g in self.groups for v in g.vectors]
        raws = [v.raw() for v in vectors]
        if len({(r.device, r.dtype) for r in raws}) != 1:
            return None
        which, lengths = self._batch_index(vectors, raws[0].device)
        s = torch.cat([t.s for t in self.transforms])
        g = torch.sigmoid if self.config.threshold_fn == "sigmoid" else torch.exp
        tau = g(s).to(raws[0].dtype)[which].repeat_interleave(lengths, output_size=sum(len(r) for r in raws))
        return _SoftThresholdFn.apply(torch.cat(raws), tau), [len(r) for r in raws]

    def _batch_index(self, vectors: list, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Per vector its transform's index, and its length: made once per device (no host→device
        copy inside a forward, which a CUDA graph capture forbids)."""
        cache = self.__dict__.setdefault("_batch_index_cache", {})
        if device not in cache:
            index = {id(t): i for i, t in enumerate(self.transforms)}
            cache[device] = (torch.tensor([index[id(v.transform)] for v in vectors], device=device),
                             torch.tensor([len(v) for v in vectors], device=device))
        return cache[device]

    def step(self, step: int) -> None:
        c = self.config
        if c.target is None:
            return
        pending: Snapshot | None = self.__dict__.get("_pending")
        if pending is not None and step >= pending.apply_at:
            self._pending = None
            apply_planned(self, pending)
        if step % c.control_every:
            return
        desired = budgets.cubic_sparsity(step, c.target, c.target_start_step, c.target_end_step)
        if desired <= 0:
            return
        lag = min(c.control_lag, c.control_every - 1)
        if lag == 0:
            track(self, desired)
        else:
            self._pending = snapshot(self, desired, apply_at=step + lag)

    def finalize(self) -> None:
        """With a target, the soft model is brought to it exactly before pruning (whatever the step; an
        update still pending is dropped)."""
        self._pending = None
        if self.config.target is not None:
            track(self, self.config.target)

    def measured_sparsity(self) -> float:
        """Fraction of ``target_unit`` that ``prune()`` would remove now (exact MACs with a cost model)."""
        with torch.no_grad():
            return self.sparsity_of(self.keep_vectors())

    def sparsity_of(self, keep: dict[int, np.ndarray], magnitude: Magnitude | None = None) -> float:
        """Fraction of ``target_unit`` removed when the structures ``keep`` marks False go (after
        ``prune()``'s rule that keeps the network connected, which needs the groups' ``magnitude`` by
        group id; by default ``GroupView.magnitude``)."""
        if "_connectivity" not in self.__dict__:
            self._connectivity = Connectivity([g.group for g in self.groups])
            self._by_id = {g.id: g for g in self.groups}
        keep, _ = self._connectivity.apply(keep, magnitude or (lambda gid: self._by_id[gid].magnitude()))
        unit, cost_model = self.config.target_unit, self.context.cost_model
        if unit == "macs" and cost_model is not None:
            return 1.0 - cost_model.after(keep) / max(cost_model.total, 1.0)
        removed = total = 0.0
        for g in self.groups:
            cost = g.macs if unit == "macs" else (g.params if unit == "params" else None)
            k = keep[g.id]
            removed += float((~k).sum() if cost is None else cost[~k].sum())
            total += float(g.width if cost is None else cost.sum())
        return removed / max(total, 1e-12)

    def thresholds(self) -> dict[str, float]:
        """Current threshold g(s) per vector."""
        return {v.name: float(v.transform.threshold.detach()) for g in self.groups for v in g.vectors}

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"s": [t.s.detach().clone() for t in self.transforms]}
        pending: Snapshot | None = self.__dict__.get("_pending")
        if pending is not None:  # a resumed run applies the same update at the same step
            pending.wait()
            state["pending"] = {"host": pending.host.clone(), "lengths": list(pending.lengths),
                                "desired": pending.desired, "apply_at": pending.apply_at}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["s"]) != len(self.transforms):
            raise ValueError(f"state has {len(state['s'])} thresholds, this policy has {len(self.transforms)}")
        with torch.no_grad():
            for t, s in zip(self.transforms, state["s"], strict=True):
                t.s.copy_(s)
        pending = state.get("pending")
        self._pending = Snapshot(**pending) if pending is not None else None


register_policy("str", STRConfig, STRPolicy)
