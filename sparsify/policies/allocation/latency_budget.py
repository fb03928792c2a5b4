"""A budget driven by estimated latency: remove channels where they cost time, not just MACs.

A uniform budget removes the same fraction everywhere, so much of what it removes sits in layers whose
time hardly depends on their width (bandwidth-bound convs at high resolution, depthwise convs): the
MACs fall, the latency much less. ``allocate_by_latency`` removes structures greedily, ``step``
channels at a time (every group keeps a multiple of ``step`` channels, or its full width, and never
loses all of them), each time from the group whose next chunk scores best:

    score = benefit / lost ** importance_weight

``benefit`` is the estimated latency the chunk saves (:class:`sparsify.measure.latency_model.LatencyModel`), per MAC it
saves when the target is in MACs (at equal MACs, the most time saved); ``lost`` is the sum of the
chunk's magnitudes, each divided by its group's mean magnitude. ``importance_weight=0`` is pure latency;
larger values protect strong channels more. The chunk of a group is its weakest kept structures. It
stops once the target is met: ``fraction`` of the exact MACs (:class:`sparsify.graph.cost.MacsModel`, to one
chunk) or of the estimated latency.

With a Sparsifier: ``Sparsifier(model, x, config=SparsifierConfig(adapter=..., policy=GMPConfig(unit="macs",
budget="latency"), round_to=8), latency_model=lambda graph: LatencyModel(graph, ...))`` (``round_to`` is the
step; see docs/sparsifier.md).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np

from sparsify.graph.channel_graph import ChannelGroup
from sparsify.graph.cost import MacsModel
from sparsify.measure.latency_model import LatencyModel
from sparsify.policies.base import GroupView

__all__ = ["allocate_by_latency", "structure_step"]

_PRODUCING = ("out", "value", "scale")
_RESYNC = 64  # chunks between exact recounts of the removed fraction


def structure_step(group: ChannelGroup, step: int) -> int:
    """Structures per chunk of ``step`` channels: a structure spanning c channels counts as c (a head of
    64 channels is a chunk of its own for step 8); groups with uneven structures use ``step``."""
    per = 1
    for m in group.members:
        if m.role in _PRODUCING and len(m.structure_of):
            counts = np.unique(m.structure_of, return_counts=True)[1]
            if (counts == counts[0]).all():
                per = max(per, int(counts[0]))
    return max(step // math.gcd(step, per), 1)


def allocate_by_latency(groups: Sequence[GroupView], magnitudes: Sequence[np.ndarray], latency_model: LatencyModel,
                        macs_model: MacsModel, fraction: float, step: int = 8, *,
                        unit: Literal["macs", "latency"] = "macs", importance_weight: float = 1.0,
                        max_group_sparsity: float = 1.0) -> list[np.ndarray]:
    """Keep vectors (one per group) removing ``fraction`` of the MACs (or of the estimated latency) where it
    saves the most time for the importance lost (see the module docstring).

    ``max_group_sparsity`` caps the fraction of a group's structures that may go. Raises ValueError if the
    groups cannot reach the target.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    if unit not in ("macs", "latency"):
        raise ValueError(f"unit must be 'macs' or 'latency', got {unit!r}")
    if int(step) != step or step < 1:
        raise ValueError(f"step must be a positive integer (e.g. 8), got {step!r}")
    if importance_weight < 0 or not 0 < max_group_sparsity <= 1:
        raise ValueError(f"importance_weight must be ≥ 0 and max_group_sparsity in (0, 1], got {importance_weight} "
                         f"and {max_group_sparsity}")
    if len(magnitudes) != len(groups) or any(len(m) != g.width for m, g in zip(magnitudes, groups, strict=False)):
        raise ValueError("magnitudes must hold one vector per group, as long as the group's width")
    return _Greedy(groups, magnitudes, latency_model, macs_model, int(step), unit, importance_weight,
                   max_group_sparsity).run(fraction)


class _Greedy:
    """The greedy state: keep vectors, each group's removal order and chunk size, and which groups share a
    layer or MAC-carrying tensor (a chunk changes the next-chunk scores of those only)."""

    def __init__(self, groups: Sequence[GroupView], magnitudes: Sequence[np.ndarray], lat: LatencyModel,
                 macs: MacsModel, step: int, unit: str, alpha: float, max_group_sparsity: float) -> None:
        self.lat, self.macs, self.unit, self.alpha, self.cap = lat, macs, unit, alpha, max_group_sparsity
        self.ids = [g.vectors[0].group.id for g in groups]
        self.widths = [g.width for g in groups]
        self.order = [np.argsort(np.asarray(m, dtype=np.float64), kind="stable") for m in magnitudes]
        self.norm = []
        for m in magnitudes:
            m = np.abs(np.asarray(m, dtype=np.float64))
            mean = float(m.mean()) if len(m) else 0.0
            self.norm.append(m / mean if mean > 0 else np.ones_like(m))
        self.steps = [structure_step(g.vectors[0].group, step) for g in groups]
        self.floor = [max(s, math.ceil(w * (1 - max_group_sparsity) - 1e-9)) for s, w in zip(self.steps, self.widths,
                                                                                            strict=True)]
        self.keep = {gid: np.ones(w, dtype=bool) for gid, w in zip(self.ids, self.widths, strict=True)}
        self.kept = list(self.widths)  # structures kept per group
        # MAC-carrying tensors each group slices: tensor → [(group id, structure_of)] (as MacsModel counts them)
        dims = macs.sliced_dims
        self.tensors_of: dict[int, list[str]] = {gid: [] for gid in self.ids}
        for t, ds in dims.items():
            for gid, _ in ds:
                if gid in self.tensors_of and t not in self.tensors_of[gid]:
                    self.tensors_of[gid].append(t)
        self.dims = dims
        pos = {gid: i for i, gid in enumerate(self.ids)}
        self.neighbours: list[set[int]] = [set() for _ in self.ids]
        layer_groups: dict[int, set[int]] = {}
        for gid, layers in lat.layers_of.items():
            for i in layers:
                layer_groups.setdefault(i, set()).add(gid)
        shared = [*layer_groups.values(), *({g for g, _ in ds} for ds in dims.values())]
        for gids in shared:
            inside = [pos[g] for g in gids if g in pos]
            for a in inside:
                self.neighbours[a].update(inside)

    def _tensor_macs(self, t: str, keep: dict[int, np.ndarray]) -> float:
        f = float(self.macs.macs[t])
        for gid, structure_of in self.dims[t]:
            if gid in keep and len(structure_of):
                f *= float(keep[gid][structure_of].sum()) / len(structure_of)
        return f

    def _next(self, k: int) -> np.ndarray | None:
        """The structures of group k's next chunk (its weakest kept ones), or None if it may not lose more."""
        n, s = self.kept[k], self.steps[k]
        target = (n - 1) // s * s
        if target < self.floor[k] or target < 1:
            return None
        removed = self.widths[k] - n
        return self.order[k][removed:removed + n - target]

    def _score(self, k: int) -> float:
        chunk = self._next(k)
        if chunk is None:
            return -math.inf
        gid, trial = self.ids[k], self._apply(k)
        saved_ms = sum(self.lat.layer_ms(i, *self.lat.widths(i, self.keep)) -
                       self.lat.layer_ms(i, *self.lat.widths(i, trial)) for i in self.lat.layers_of.get(gid, ()))
        benefit = saved_ms
        if self.unit == "macs":
            saved_macs = sum(self._tensor_macs(t, self.keep) - self._tensor_macs(t, trial)
                             for t in self.tensors_of[gid])
            if saved_macs <= 0:
                return -math.inf
            benefit = saved_ms / saved_macs
        lost = (float(self.norm[k][chunk].sum()) + 1e-9) ** self.alpha
        return benefit / lost if benefit >= 0 else benefit * lost

    def _removed(self, keep: dict[int, np.ndarray] | None = None) -> float:
        """The exact fraction of the MACs (or of the estimated latency) removed under ``keep``."""
        keep = self.keep if keep is None else keep
        if self.unit == "macs":
            return 1.0 - self.macs.after(keep) / self.macs.total
        return 1.0 - self.lat.after(keep) / self.lat.total

    def _delta(self, k: int, trial: dict[int, np.ndarray]) -> float:
        """The fraction group k's next chunk removes (from the tensors or layers it changes only)."""
        gid = self.ids[k]
        if self.unit == "macs":
            saved = sum(self._tensor_macs(t, self.keep) - self._tensor_macs(t, trial) for t in self.tensors_of[gid])
            return saved / self.macs.total
        return sum(self.lat.layer_ms(i, *self.lat.widths(i, self.keep)) - self.lat.layer_ms(i, *self.lat.widths(
            i, trial)) for i in self.lat.layers_of.get(gid, ())) / self.lat.total

    def run(self, fraction: float) -> list[np.ndarray]:
        scores = [self._score(k) for k in range(len(self.ids))]
        # the removed fraction is updated by each chunk's own change and recomputed exactly where the target is
        # near and every _RESYNC chunks (a full count per chunk dominated ViT-B/16's allocation time)
        removed, since_exact = self._removed(), 0
        while removed < fraction:
            best = int(np.argmax(scores)) if scores else -1
            if best < 0 or scores[best] == -math.inf:
                cap = (f" or has lost max_group_sparsity={self.cap:g} of its structures; lower the target or the "
                       "step, or raise max_group_sparsity") if self.cap < 1 else "; lower the target or the step"
                raise ValueError(f"the latency budget removes only {self._removed():.1%} of the {self.unit}, short "
                                 f"of {fraction:.1%}: every group is down to one chunk of its step{cap}")
            trial = self._apply(best)
            after = removed + self._delta(best, trial)
            since_exact += 1
            if after >= fraction - 1e-6 or since_exact >= _RESYNC:
                after, since_exact = self._removed(trial), 0
            if after >= fraction:  # the last chunk: the one that overshoots least
                last = [(self._removed(self._apply(k)), -scores[k], k) for k in range(len(self.ids))
                        if scores[k] > -math.inf]
                after, _, best = min(t for t in last if t[0] >= fraction)
                trial = self._apply(best)
            self.keep, removed = trial, after
            self.kept[best] = int(self.keep[self.ids[best]].sum())
            for k in self.neighbours[best] | {best}:
                scores[k] = self._score(k)
        return [self.keep[gid] for gid in self.ids]

    def _apply(self, k: int) -> dict[int, np.ndarray]:
        """The keep vectors with group k's next chunk removed."""
        gid, keep = self.ids[k], dict(self.keep)
        keep[gid] = keep[gid].copy()
        keep[gid][self._next(k)] = False
        return keep
