"""Channel-dependency graph and channel groups.

Nodes of the networkx graph are channel spaces; edges are couplings (``kind`` = ``identity``,
``index_map`` for permutations, offsets and grouped-conv blocks). Identity edges are collapsed
first; the remaining index maps are resolved per channel with a vectorised union-find. A
``ChannelGroup`` is a connected component; its *structures* (the entries of its importance
vector) are the classes of channels that must be removed together.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import numpy as np
from torch import nn
from torch.nn.utils import parametrize

from sparsify.graph.builder import GraphFacts, MemberSpec, Space
from sparsify.graph.collect import collect_facts
from sparsify.graph.trace import TracedModel, trace

_ROLE_PRIORITY = {"out": 0, "scale": 1, "bias": 2, "in": 3, "stat": 4, "other": 5, "value": 6}


@dataclass
class Member:
    """A parameter/buffer dim sliced with a group: index i of ``tensor`` dim ``dim`` belongs to
    structure ``structure_of[i]`` of the group."""

    tensor: str
    dim: int
    role: str
    module: str
    structure_of: np.ndarray
    space: Space
    derived_from: str = ""  # e.g. "flatten at node 'flatten'" for members reached through a merge

    def indices(self, structures: np.ndarray) -> np.ndarray:
        """Indices of this member that belong to any of ``structures``."""
        chosen = np.zeros(int(self.structure_of.max(initial=-1)) + 1, dtype=bool)
        structures = np.asarray(structures, dtype=np.int64)
        chosen[structures[structures < len(chosen)]] = True
        return np.flatnonzero(chosen[self.structure_of])


@dataclass
class ChannelGroup:
    """Channels that must be pruned together, as ``width`` structures."""

    id: int
    name: str
    width: int
    members: list[Member]
    spaces: list[Space]
    blocked: list[str] = field(default_factory=list)
    inexact: list[str] = field(default_factory=list)
    sinks: list[tuple[Space, np.ndarray, str]] = field(default_factory=list)  # (space, structure_of, why)
    kind: str = "channel"  # what a structure is: "channel", "head", "kv_group", "rnn_unit", ... (OpContext.label)

    @property
    def prunable(self) -> bool:
        return not self.blocked and any(m.role in ("out", "scale", "value") for m in self.members)

    @property
    def exact(self) -> bool:
        """Whether removing all-zero structures leaves the network's function unchanged."""
        return not self.inexact

    def why_not(self) -> str:
        if self.blocked:
            return self.blocked[0]
        if not self.prunable:
            return "no parameter produces these channels"
        return ""

    def modules(self) -> list[str]:
        return sorted({m.module for m in self.members})


@dataclass
class ChannelGraph:
    """The channel-dependency graph of a model: its trace, networkx graph and groups."""

    traced: TracedModel
    facts: GraphFacts
    graph: nx.Graph
    groups: list[ChannelGroup]
    stale: bool = False

    @property
    def model(self) -> nn.Module:
        return self.traced.model

    def prunable_groups(self) -> list[ChannelGroup]:
        return [g for g in self.groups if g.prunable]

    def group(self, key: int | str) -> ChannelGroup:
        for g in self.groups:
            if g.id == key or g.name == key:
                return g
        raise KeyError(f"no channel group {key!r}; known: {[g.name for g in self.groups][:20]} …")

    def signature_rows(self) -> list[tuple[Any, ...]]:
        """Every group as plain data, in order: (name, width, kind, prunable, exact, members as
        (tensor, dim, role, derived_from, structure of each index), blocked reasons, inexact reasons).
        Two builds of the same model must give equal rows (see :meth:`signature`)."""
        return [(g.name, g.width, g.kind, g.prunable, g.exact,
                 tuple((m.tensor, m.dim, m.role, m.derived_from, tuple(m.structure_of.tolist())) for m in g.members),
                 tuple(g.blocked), tuple(g.inexact)) for g in self.groups]

    def signature(self) -> str:
        """A stable hash of :meth:`signature_rows`: equal for equal channel groups, in any process."""
        return hashlib.sha256(repr(self.signature_rows()).encode()).hexdigest()


def build_channel_graph(model: nn.Module, example_inputs: Any) -> ChannelGraph:
    """Trace ``model`` and group its channels. The model is left unchanged."""
    traced = trace(model, example_inputs)
    facts = collect_facts(traced)
    _couple_shared_members(facts)
    graph, groups = _group(facts)
    _block_foreign_parametrizations(model, groups)
    return ChannelGraph(traced, facts, graph, groups)


def foreign_parametrizations(model: nn.Module) -> dict[str, str]:
    """Qualified tensor name → the parametrizations on it (``weight_norm``, ``spectral_norm``,
    ``orthogonal``, torch.ao's ``FakeSparsity``, a user's own), for tensors parametrized by anything
    that is not sparsify's own (a live Sparsifier's masks and thresholds)."""
    out = {}
    for module_name, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        for attr, plist in module.parametrizations.items():
            foreign = [type(p).__name__ for p in plist if not type(p).__module__.startswith("sparsify.")]
            if foreign:
                out[f"{module_name}.{attr}" if module_name else attr] = " → ".join(foreign)
    return out


def _block_foreign_parametrizations(model: nn.Module, groups: list[ChannelGroup]) -> None:
    """A group with a member under someone else's parametrization is a barrier. Slicing what the
    parametrization computes is impossible (it is recomputed from its originals), and slicing the
    originals is exact only for element-wise ones: weight_norm's norm over the input dims,
    spectral_norm's σ and orthogonal's matrix all change when a dim is sliced, and a user's own is
    opaque. So these channels are refused before anything is touched, with the fix."""
    foreign = foreign_parametrizations(model)
    if not foreign:
        return
    changed = False
    for g in groups:
        for m in g.members:
            if m.tensor in foreign:
                module, _, attr = m.tensor.rpartition(".")
                g.blocked.append(
                    f"{m.tensor} is parametrized ({foreign[m.tensor]}; torch.nn.utils.parametrize), which sparsify "
                    f"cannot slice exactly. Fix: torch.nn.utils.parametrize.remove_parametrizations("
                    f"model.get_submodule({module!r}), {attr!r}, leave_parametrized=True) before sparsifying, "
                    "and parametrize the pruned model again")
                changed = True
                break
    if changed:
        groups.sort(key=lambda g: (not g.prunable, g.id))
        for i, g in enumerate(groups):
            g.id = i


def _couple_shared_members(facts: GraphFacts) -> None:
    """A tensor dim declared on two spaces (tied weights, get_attr reuse) couples those spaces."""
    by_tensor: dict[tuple[str, int], list[Space]] = {}
    for m in facts.members:
        by_tensor.setdefault((m.tensor, m.dim), []).append(m.space)
    for spaces in by_tensor.values():
        for s in spaces[1:]:
            if s != spaces[0]:
                facts.same.append((spaces[0], s))


class _UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        root = i
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[i] != root:
            self.parent[i], i = root, self.parent[i]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def _element_labels(n: int, us: list[np.ndarray], vs: list[np.ndarray]) -> np.ndarray:
    """Connected components of n elements under the given element pairs (vectorised)."""
    labels = np.arange(n, dtype=np.int64)
    if not us:
        return labels
    u, v = np.concatenate(us), np.concatenate(vs)
    while True:
        lu, lv = labels[u], labels[v]
        low = np.minimum(lu, lv)
        before = labels.copy()
        np.minimum.at(labels, lu, low)
        np.minimum.at(labels, lv, low)
        labels = labels[labels]
        while True:  # pointer jumping to the root
            jumped = labels[labels]
            if np.array_equal(jumped, labels):
                break
            labels = jumped
        if np.array_equal(labels, before):
            return labels


def _group(facts: GraphFacts) -> tuple[nx.Graph, list[ChannelGroup]]:
    spaces = list(facts.widths)
    index = {s: i for i, s in enumerate(spaces)}
    graph = nx.Graph()
    graph.add_nodes_from((s, {"width": facts.widths[s]}) for s in spaces)
    uf = _UnionFind(len(spaces))
    for a, b in facts.same:
        graph.add_edge(a, b, kind="identity")
        uf.union(index[a], index[b])
    roots = sorted({uf.find(i) for i in range(len(spaces))})
    offset, total = {}, 0
    for r in roots:
        offset[r] = total
        total += facts.widths[spaces[r]]
    us, vs = [], []
    comp_uf = _UnionFind(len(spaces))
    for a, b, ia, ib in facts.pairs:
        graph.add_edge(a, b, kind="index_map")
        ra, rb = uf.find(index[a]), uf.find(index[b])
        us.append(offset[ra] + ia)
        vs.append(offset[rb] + ib)
        comp_uf.union(ra, rb)
    labels = _element_labels(total, us, vs)

    members_by_root: dict[int, list[MemberSpec]] = {}
    for m in facts.members:
        members_by_root.setdefault(uf.find(index[m.space]), []).append(m)
    spaces_by_root: dict[int, list[Space]] = {}
    for s in spaces:
        spaces_by_root.setdefault(uf.find(index[s]), []).append(s)

    components: dict[int, list[int]] = {}
    for r in roots:
        components.setdefault(comp_uf.find(r), []).append(r)

    groups: list[ChannelGroup] = []
    root_group: dict[int, ChannelGroup] = {}
    root_structures: dict[int, np.ndarray] = {}
    for comp_roots in components.values():
        elements = np.concatenate([offset[r] + np.arange(facts.widths[spaces[r]]) for r in comp_roots])
        _, first, inverse = np.unique(labels[elements], return_index=True, return_inverse=True)
        order = np.argsort(np.argsort(first))  # number structures in order of first appearance
        sids = order[inverse]
        group = ChannelGroup(id=len(groups), name="", width=len(first), members=[], spaces=[])
        pos = 0
        for r in comp_roots:
            w = facts.widths[spaces[r]]
            root_structures[r] = sids[pos:pos + w]
            pos += w
            root_group[r] = group
            group.spaces.extend(spaces_by_root[r])
            for s in spaces_by_root[r]:
                group.blocked.extend(facts.blocked.get(s, []))
                group.inexact.extend(facts.inexact.get(s, []))
                if s in facts.sinks:
                    group.sinks.append((s, root_structures[r], facts.sinks[s]))
                if s in facts.kinds and group.kind == "channel":
                    group.kind = facts.kinds[s]
            for m in members_by_root.get(r, []):
                group.members.append(Member(m.tensor, m.dim, m.role, m.module, root_structures[r].copy(), m.space))
        groups.append(group)

    _apply_merges(facts, uf, index, root_group, root_structures)
    for g in groups:
        _dedupe_members(g)
        g.blocked = list(dict.fromkeys(g.blocked))
        g.inexact = list(dict.fromkeys(g.inexact))
        g.name = _name(g)
    groups = [g for g in groups if g.members]
    groups.sort(key=lambda g: (not g.prunable, g.id))
    _unique_names(groups)
    for i, g in enumerate(groups):
        g.id = i
    return graph, groups


def _apply_merges(facts: GraphFacts, uf: _UnionFind, index: dict[Space, int],
                  root_group: dict[int, ChannelGroup], root_structures: dict[int, np.ndarray]) -> None:
    """Members indexed by a product of spaces (flatten → linear) join each factor's group."""
    for merge in facts.merges:
        out_root = uf.find(index[merge.out])
        target = root_group[out_root]
        consumed = {(m.tensor, m.dim) for m in target.members if m.role == "in"}  # a get_attr's "value" too
        producers = [m for m in target.members if m.role in ("out", "scale", "value", "bias")
                     and not (m.role == "value" and (m.tensor, m.dim) in consumed)]
        out_sids = root_structures[out_root]
        # every member must index flattened elements only (not also channels concatenated next to them)
        covered = all(np.isin(m.structure_of, out_sids).all() for m in target.members)
        if producers or target.blocked or not covered or len(np.unique(out_sids)) != len(out_sids):
            reason = (f"{merge.op}: its flattened output is a barrier ({target.blocked[0]})" if target.blocked
                      else f"{merge.op}: its flattened output is also produced or coupled elsewhere")
            target.blocked.append(reason)
            for f in merge.factors:
                root_group[uf.find(index[f])].blocked.append(reason)
            continue
        target.blocked.append(f"indexed by a product of other channel groups ({merge.op})")
        for factor, coords in zip(merge.factors, merge.coords, strict=True):
            froot = uf.find(index[factor])
            fgroup = root_group[froot]
            factor_sids = root_structures[froot][coords]  # out element → factor structure
            for m in target.members:
                # member index i ↔ out element with the same structure id in the target group
                element_of = np.argsort(out_sids)[np.searchsorted(np.sort(out_sids), m.structure_of)]
                fgroup.members.append(Member(m.tensor, m.dim, m.role, m.module, factor_sids[element_of],
                                             m.space, derived_from=merge.op))


def _dedupe_members(group: ChannelGroup) -> None:
    best: dict[tuple[str, int, str], Member] = {}
    for m in group.members:
        key = (m.tensor, m.dim, m.derived_from)
        other = best.get(key)
        if other is None:
            best[key] = m
            continue
        if not np.array_equal(other.structure_of, m.structure_of):
            group.blocked.append(f"{m.tensor} dim {m.dim} is used with two different channel orders")
        if _ROLE_PRIORITY[m.role] < _ROLE_PRIORITY[other.role]:
            best[key] = m
    group.members = list(best.values())


def _name(group: ChannelGroup) -> str:
    """The first producing module (or parameter, for bare parameters), and how many more."""
    producers = [m for m in group.members if m.role in ("out", "value")]
    if not producers:
        return f"{group.members[0].tensor}[{group.members[0].dim}]" if group.members else f"group{group.id}"
    first = producers[0]
    base = first.module if first.tensor == f"{first.module}.weight" else first.tensor
    more = len({m.tensor for m in producers}) - 1
    return f"{base} (+{more})" if more > 0 else base


def _unique_names(groups: list[ChannelGroup]) -> None:
    seen: dict[str, int] = {}
    for g in groups:
        if g.name in seen:
            seen[g.name] += 1
            g.name = f"{g.name}#{seen[g.name]}"
        else:
            seen[g.name] = 0
