"""The one road from keep vectors to a removal plan ``{group id: structure indices to remove}``.

``removal_plan(graph, keep, magnitude, round_to=...)`` is what ``Sparsifier.prune`` and
``sparsify.oneshot.apply_plan`` both call; it applies, in order:

1. **Connectivity** (:class:`Connectivity`): a group that would lose every structure keeps its
   strongest one, and so does every member layer it would empty (one branch of a concat).
2. **Rounding** (:func:`round_keep`, ``round_to``): hardware-friendly widths (below).

Works on :class:`~sparsify.graph.channel_graph.ChannelGroup` s and numpy arrays only. ``magnitude``
ranks structures (larger = stronger); it is called per group id, and only where a rule needs it.

Rounding. GPU kernels (tensor-core convolutions and GEMMs) run fastest when channel counts are
multiples of 8, 16 or 64; a layer pruned to 61 channels can be slower than the dense 64. Each
layer's kept count is rounded UP by keeping back the removed structures with the largest
importance. Nothing that the plan keeps is ever removed, so a plan whose removed structures are
exact zeros in the soft model (STR, GMP masks) stays exact after rounding: the structures kept back
simply carry their zero weights. Rules, per producing layer of a group (a conv/linear output, a BN
scale, ...), counted in channels:

* the kept count becomes the smallest multiple of ``round_to`` that is at least the planned count;
* a count can never exceed the layer's original width: where the next multiple is larger (and for
  layers narrower than ``round_to``), the layer keeps its original width;
* a structure that spans ``c`` channels (a conv group, an attention head) counts as ``c`` channels, so
  heads of 64 channels already satisfy ``round_to=8`` and nothing is kept back for them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from sparsify.graph.channel_graph import ChannelGraph, ChannelGroup

__all__ = ["Connectivity", "check_round_to", "protect_members", "removal_plan", "round_keep", "round_plan",
           "rounded_width"]

Magnitude = Callable[[int], np.ndarray]  # group id → one value per structure (larger = stronger)


def removal_plan(graph: ChannelGraph, keep: Mapping[int, np.ndarray], magnitude: Magnitude, *,
                 round_to: int | None = None, connectivity: Connectivity | None = None
                 ) -> tuple[dict[int, np.ndarray], list[str]]:
    """The structures to remove per group id (groups with nothing to remove left out), from ``keep``
    (bool per structure, per group id): connectivity first, then rounding to ``round_to`` channels.

    Returns the plan and the names of the groups the connectivity rule changed. ``connectivity``
    (built once for ``keep``'s groups) saves rebuilding the rule's index on every call."""
    rule = connectivity if connectivity is not None else Connectivity([graph.group(gid) for gid in keep])
    keep, kept = rule.apply(keep, magnitude)
    if round_to is not None and check_round_to(round_to) > 1:
        keep = {gid: round_keep(graph.group(gid), k, round_to, magnitude(gid)) for gid, k in keep.items()}
    plan = {gid: np.flatnonzero(~k) for gid, k in keep.items()}
    return {gid: s for gid, s in plan.items() if len(s)}, kept


def protect_members(group: ChannelGroup, removed: np.ndarray, magnitude: np.ndarray | None = None
                    ) -> tuple[np.ndarray, bool]:
    """``removed`` minus, for every member it would empty (one branch of a concat), that member's
    strongest structure by ``magnitude`` (its first if None). Returns (removed, whether it changed)."""
    removed = np.asarray(removed, dtype=np.int64)
    changed = False
    for m in group.members:
        mine = np.unique(m.structure_of)
        if len(removed) and np.isin(mine, removed).all():
            best = mine[np.argmax(magnitude[mine])] if magnitude is not None else mine[0]
            removed = removed[removed != best]
            changed = True
    return removed, changed


class Connectivity:
    """The rule that keeps the network connected: a group that would lose every structure keeps its
    strongest, and so does every member layer it would empty (one branch of a concat). Vectorised over
    all groups (it runs inside the STR controller's search)."""

    def __init__(self, groups: Sequence[ChannelGroup]) -> None:
        self.groups = list(groups)
        self.ids = [g.id for g in self.groups]
        self.widths = np.asarray([g.width for g in self.groups], dtype=np.int64)
        self.starts = np.cumsum(self.widths) - self.widths
        index, lengths, owner = [], [], []
        for i, g in enumerate(self.groups):
            for m in g.members:
                mine = np.unique(m.structure_of)
                if len(mine):
                    index.append(mine + self.starts[i])
                    lengths.append(len(mine))
                    owner.append(i)
        self.member_index = np.concatenate(index) if index else np.zeros(0, dtype=np.int64)
        self.member_lengths = np.asarray(lengths, dtype=np.int64)
        self.member_starts = np.cumsum(self.member_lengths) - self.member_lengths
        self.member_owner = np.asarray(owner, dtype=np.int64)

    def apply(self, keep: Mapping[int, np.ndarray], magnitude: Magnitude) -> tuple[dict[int, np.ndarray], list[str]]:
        """The keep vectors after the rule, and the names of the groups it changed."""
        out, changed = dict(keep), []
        flat = np.concatenate([keep.get(gid, np.ones(w, dtype=bool)) for gid, w in zip(self.ids, self.widths,
                                                                                       strict=True)])
        nonempty = np.logical_or.reduceat(flat, self.starts) if len(flat) else np.zeros(0, dtype=bool)
        for i in np.flatnonzero(~nonempty & (self.widths > 0)):
            g = self.groups[i]
            k = flat[self.starts[i]:self.starts[i] + self.widths[i]]  # a view: the fix shows in `flat`
            k[int(np.argmax(magnitude(g.id)))] = True
            changed.append(g.name)
        if len(self.member_starts):
            counts = np.add.reduceat(flat[self.member_index], self.member_starts, dtype=np.int64)
            for i in np.unique(self.member_owner[counts == 0]):  # rare: look closer only there
                g = self.groups[i]
                k = flat[self.starts[i]:self.starts[i] + self.widths[i]]
                removed, _ = protect_members(g, np.flatnonzero(~k), magnitude(g.id))
                k[:] = True
                k[removed] = False
                changed.append(g.name)
        for i, gid in enumerate(self.ids):
            if gid in keep:
                out[gid] = flat[self.starts[i]:self.starts[i] + self.widths[i]].copy()
        return out, changed

_PRODUCING = ("out", "value", "scale")


def check_round_to(round_to: object) -> int:
    """``round_to`` as an int ≥ 1, or a ValueError that says what to pass."""
    if isinstance(round_to, bool) or not isinstance(round_to, (int, np.integer)) or round_to < 1:
        raise ValueError(f"round_to must be a positive integer (e.g. 8, 16 or 64; 1 or None disables rounding), "
                         f"got {round_to!r}")
    return int(round_to)


def rounded_width(kept: int, width: int, step: int) -> int:
    """The smallest multiple of ``step`` that is ≥ ``kept``, or ``width`` if that multiple exceeds it."""
    if not 0 <= kept <= width:
        raise ValueError(f"kept ({kept}) must be between 0 and the width ({width})")
    target = -(-kept // step) * step
    return width if target > width else target


def _units(group: ChannelGroup, round_to: int) -> list[tuple[np.ndarray, int]]:
    """Per distinct producing layer: (the structures it holds, how many structures make one step).

    A layer whose structures all span ``c`` channels needs kept structures in multiples of
    ``round_to / gcd(round_to, c)``; a layer with uneven structures is not rounded (step 1).
    """
    seen: dict[tuple[bytes, int], tuple[np.ndarray, int]] = {}
    for m in group.members:
        if m.role not in _PRODUCING or not len(m.structure_of):
            continue
        mine, counts = np.unique(m.structure_of, return_counts=True)
        step = round_to // math.gcd(round_to, int(counts[0])) if (counts == counts[0]).all() else 1
        if step > 1:
            seen.setdefault((mine.tobytes(), step), (mine, step))
    return list(seen.values())


def round_keep(group: ChannelGroup, keep: np.ndarray, round_to: int,
               importance: np.ndarray | None = None) -> np.ndarray:
    """``keep`` (bool per structure) plus the strongest removed structures needed to round every
    producing layer of ``group`` up to a multiple of ``round_to`` channels (or to its full width).

    ``importance`` ranks the removed structures (largest kept back first); without it, lower indices
    come back first. Only structures are added, never removed.
    """
    round_to = check_round_to(round_to)
    keep = np.array(keep, dtype=bool).reshape(-1)
    if keep.size != group.width:
        raise ValueError(f"keep has {keep.size} entries; group '{group.name}' has {group.width} structures")
    if importance is None:
        order = np.arange(group.width)
    else:
        importance = np.asarray(importance, dtype=np.float64).reshape(-1)
        if importance.size != group.width:
            raise ValueError(f"importance has {importance.size} entries; group '{group.name}' has "
                             f"{group.width} structures")
        order = np.argsort(-importance, kind="stable")
    if round_to == 1:
        return keep
    units = _units(group, round_to)
    changed = True
    while changed:  # adding structures to one layer can un-round another that shares them; only adds, so it ends
        changed = False
        for mine, step in units:
            kept = int(keep[mine].sum())
            need = rounded_width(kept, len(mine), step) - kept
            if need > 0:
                in_mine = np.zeros(group.width, dtype=bool)
                in_mine[mine] = True
                candidates = order[in_mine[order] & ~keep[order]]
                keep[candidates[:need]] = True
                changed = True
    return keep


def round_plan(graph: ChannelGraph, plan: Mapping[int | str, Sequence[int]], round_to: int | None,
               importance: Mapping[int | str, np.ndarray] | None = None) -> dict[int | str, np.ndarray]:
    """Round a pruning plan (``{group id or name: removed structures}``) for the hardware.

    Every producing layer of a planned group keeps a multiple of ``round_to`` channels, or its full
    width where the next multiple would exceed it; the removed structures with the largest
    ``importance[group]`` are kept back. Returns a new plan with the same keys (groups left with
    nothing to remove map to an empty array); ``round_to`` None or 1 returns the plan unchanged.
    """
    out = {k: np.unique(np.asarray(list(v), dtype=np.int64)) for k, v in plan.items()}
    if round_to is None:
        return out
    round_to = check_round_to(round_to)
    importance = importance or {}
    for key, removed in out.items():
        group = graph.group(key)
        if len(removed) and (removed.min() < 0 or removed.max() >= group.width):
            raise ValueError(f"plan for group '{group.name}' has structure indices outside [0, {group.width})")
        imp = importance.get(key, importance.get(group.id, importance.get(group.name)))
        keep = np.ones(group.width, dtype=bool)
        keep[removed] = False
        out[key] = np.flatnonzero(~round_keep(group, keep, round_to, imp))
    return out
