"""STR's budget controller: one common shift of every threshold parameter, found by bisection.

``track(policy, desired)`` shifts every ``s`` by the smallest common δ with which the soft model zeroes
at least ``desired`` of the policy's ``target_unit`` (exact MACs with a cost model), then returns the
fraction measured on the model. δ may be negative (thresholds come down when the soft model is ahead
of the schedule). A common shift in ``s`` is a common factor on exp thresholds and a common offset in
logit space for sigmoid ones, so the controller sets the level while each layer's loss gradient on its
own ``s`` keeps learning the split. No vector's threshold is raised past ``max_vector_sparsity`` zeros
by the controller (a threshold the loss already put higher is left where it is): a common shift would
otherwise empty weak layers. The search runs on host copies (one device→host copy per call).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch import nn

from sparsify.policies.base import GroupView
from sparsify.prune.select import Magnitude


class ControllerSettings(Protocol):
    threshold_fn: str  # "sigmoid" or "exp"
    max_vector_sparsity: float


class Controlled(Protocol):
    """What the controller reads and writes on a soft-threshold policy (``STRPolicy``)."""

    groups: list[GroupView]
    transforms: Sequence[nn.Module]  # each with a threshold parameter ``s`` of shape (1,)

    @property
    def config(self) -> ControllerSettings: ...

    def flat_structures(self) -> tuple[np.ndarray, np.ndarray]: ...

    def keep_from_nonzero(self, nonzero: np.ndarray) -> dict[int, np.ndarray]: ...

    def sparsity_of(self, keep: dict[int, np.ndarray], magnitude: Magnitude | None = None) -> float: ...

_SPAN = 30.0  # the bisection searches δ in [−_SPAN, _SPAN] (exp: a factor e^±30 on every threshold)
_ITERATIONS = 30


def threshold(fn: str, s: torch.Tensor) -> torch.Tensor:
    return torch.exp(s) if fn == "exp" else torch.sigmoid(s)


def threshold_parameter(fn: str, tau: torch.Tensor) -> torch.Tensor:
    """The inverse of ``threshold``."""
    return torch.log(tau) if fn == "exp" else torch.logit(tau.clamp(max=1 - 1e-12))


def cap_thresholds(magnitudes: torch.Tensor, lengths: list[int], max_sparsity: float) -> torch.Tensor:
    """Per vector (``magnitudes`` is the vectors' |values| laid end to end, ``lengths`` their sizes), a
    threshold that zeroes at most ``floor(max_sparsity · n)`` of its entries: midway between the largest
    value allowed to go and the first kept one; ``inf`` when that allows every entry."""
    n = torch.tensor(lengths)
    allowed = torch.floor(max_sparsity * n.double() + 1e-9).long()
    caps = torch.full((len(lengths),), float("inf"), dtype=torch.float64)
    limited = allowed < n
    if not limited.any():
        return caps
    owner = torch.arange(len(lengths)).repeat_interleave(n)
    values = magnitudes.double()
    by_value = torch.argsort(values, stable=True)
    order = by_value[torch.argsort(owner[by_value], stable=True)]  # by vector, then by value
    ordered, owner_sorted = values[order], owner[order]
    starts = torch.cumsum(n, 0) - n
    first_kept = torch.full((len(lengths),), float("inf"), dtype=torch.float64)
    first_kept[limited] = ordered[(starts + allowed)[limited]]
    below_count = torch.bincount(owner_sorted, weights=(ordered < first_kept[owner_sorted]).double(),
                                 minlength=len(lengths)).long()  # entries under the first kept one
    last_below = ordered[(starts + below_count - 1).clamp(0, len(ordered) - 1)]
    below = torch.where(below_count > 0, last_below, torch.zeros_like(last_below))[limited]
    first_kept = first_kept[limited]
    caps[limited] = torch.clamp(0.5 * (below + first_kept), min=1e-30)
    return caps


@dataclass
class Snapshot:
    """What a controller update reads: every vector's |value| and every ``s``, copied to the host at one
    step (into pinned memory, without waiting, on CUDA) and searched at ``apply_at``."""

    host: torch.Tensor  # magnitudes laid end to end, then the s values (float64)
    lengths: list[int]
    desired: float
    apply_at: int
    ready: torch.cuda.Event | None = None

    def wait(self) -> None:
        if self.ready is not None:
            self.ready.synchronize()


def snapshot(policy: Controlled, desired: float, apply_at: int = 0) -> Snapshot:
    """Start copying the vectors and thresholds to the host; on CUDA the copy runs behind the queued work."""
    with torch.no_grad():
        raw = [v.raw().detach().flatten() for g in policy.groups for v in g.vectors]
        device = raw[0].device
        flat = torch.cat([torch.cat([r.to(device, torch.float64).abs() for r in raw]),
                          torch.cat([t.s.detach().to(device, torch.float64) for t in policy.transforms])])
        if device.type != "cuda":
            return Snapshot(flat.cpu(), [len(r) for r in raw], desired, apply_at)
        host = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=True)
        host.copy_(flat, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(device))
    return Snapshot(host, [len(r) for r in raw], desired, apply_at, ready)


def plan_shift(policy: Controlled, snap: Snapshot) -> tuple[float, torch.Tensor, torch.Tensor]:
    """The common shift δ found on the snapshot, the per-transform bound on the new thresholds
    (float64, host) and the new ``s`` values it gives from the snapshot's ``s`` (in ``s``'s dtype)."""
    snap.wait()
    fn = policy.config.threshold_fn
    vectors = [v for g in policy.groups for v in g.vectors]
    dtype, s_dtype = vectors[0].raw().dtype, policy.transforms[0].s.dtype
    lengths = snap.lengths
    magnitude, s = snap.host[:sum(lengths)].to(dtype), snap.host[sum(lengths):]
    index = {id(t): i for i, t in enumerate(policy.transforms)}
    owner = torch.tensor([index[id(v.transform)] for v in vectors])
    entry_owner = owner.repeat_interleave(torch.tensor(lengths))
    per_vector_cap = cap_thresholds(magnitude, lengths, policy.config.max_vector_sparsity)
    cap = torch.full((len(policy.transforms),), float("inf"), dtype=torch.float64)
    cap = cap.scatter_reduce(0, owner, per_vector_cap, reduce="amin")
    bound = torch.maximum(threshold(fn, s), cap)  # the controller never pushes past the cap, nor pulls below it
    structure, bounds = policy.flat_structures()
    strongest = np.zeros(bounds[-1])
    np.maximum.at(strongest, structure, magnitude.double().numpy())
    group_magnitude = {g.id: strongest[a:b] for g, a, b in zip(policy.groups, bounds[:-1], bounds[1:], strict=True)}

    def parameters_at(delta: float) -> torch.Tensor:
        return threshold_parameter(fn, torch.minimum(threshold(fn, s + delta), bound)).to(s_dtype)

    def sparsity_at(delta: float) -> float:
        tau = threshold(fn, parameters_at(delta)).to(dtype)  # as the device computes it: g(s) in s's dtype
        keep = policy.keep_from_nonzero((magnitude > tau[entry_owner]).numpy())
        return policy.sparsity_of(keep, group_magnitude.__getitem__)

    lo, hi = -_SPAN, _SPAN
    if sparsity_at(lo) >= snap.desired:
        hi = lo
    elif sparsity_at(hi) >= snap.desired:
        for _ in range(_ITERATIONS):
            mid = 0.5 * (lo + hi)
            lo, hi = (lo, mid) if sparsity_at(mid) >= snap.desired else (mid, hi)
    return hi, cap, parameters_at(hi)


def _write(policy: Controlled, values: torch.Tensor) -> None:
    with torch.no_grad():
        for t, value in zip(policy.transforms, values.split(1), strict=True):
            t.s.copy_(value)


def track(policy: Controlled, desired: float) -> None:
    """Bring the soft model to at least ``desired`` sparsity with one common threshold shift, now (one
    device→host copy and wait; see the module docstring)."""
    *_, new_s = plan_shift(policy, snapshot(policy, desired))
    device = policy.transforms[0].s.device
    _write(policy, new_s.to(device))


def apply_planned(policy: Controlled, snap: Snapshot) -> None:
    """A deferred update: the shift planned on ``snap`` applied to the thresholds as they are *now* (the
    loss has moved them since the snapshot), computed on their device, so the host never waits for it:
    each new threshold is g(s + δ), kept under the bound max(g(s), cap)."""
    delta, cap, _ = plan_shift(policy, snap)
    fn = policy.config.threshold_fn
    with torch.no_grad():
        s = torch.cat([t.s.detach() for t in policy.transforms])
        cap = cap.pin_memory().to(s.device, non_blocking=True) if s.device.type == "cuda" else cap.to(s.device)
        s64 = s.double()
        tau = torch.minimum(threshold(fn, s64 + delta), torch.maximum(threshold(fn, s64), cap))
        _write(policy, threshold_parameter(fn, tau).to(s.dtype))
