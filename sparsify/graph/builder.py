"""Collects what op rules say about a traced graph: channel spaces, couplings, members, barriers.

A *channel space* is one dimension of one traced value, keyed ``(value_key, dim)``; ``value_key``
is the fx node name, or ``"name.k"`` for element ``k`` of a node that returns a tuple. Width-1
dimensions never carry prunable channels and are ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from sparsify._utils import get_tensor
from sparsify.graph.trace import TensorInfo, TracedModel

Space = tuple[str, int]

#: Member roles. ``out``/``scale``/``value`` make the channel (zeroing them zeroes its effect),
#: ``bias`` adds a constant to it, ``in`` consumes it, ``stat``/``other`` are sliced only.
ROLES = ("out", "scale", "value", "bias", "in", "stat", "other")


@dataclass(frozen=True)
class MemberSpec:
    """A parameter or buffer dimension that indexes the channels of ``space``."""

    space: Space
    tensor: str  # fully qualified name of the parameter or buffer
    dim: int
    role: str
    module: str  # fully qualified name of the module that owns ``tensor``


@dataclass(frozen=True)
class Merge:
    """``out`` indexes the row-major product of ``factors``; ``coords[i][j]`` is factor i of j."""

    out: Space
    factors: tuple[Space, ...]
    coords: tuple[np.ndarray, ...]
    op: str


@dataclass
class GraphFacts:
    """Everything the op rules declared, before grouping."""

    widths: dict[Space, int] = field(default_factory=dict)
    same: list[tuple[Space, Space]] = field(default_factory=list)
    pairs: list[tuple[Space, Space, np.ndarray, np.ndarray]] = field(default_factory=list)
    merges: list[Merge] = field(default_factory=list)
    members: list[MemberSpec] = field(default_factory=list)
    blocked: dict[Space, list[str]] = field(default_factory=dict)
    inexact: dict[Space, list[str]] = field(default_factory=dict)
    sinks: dict[Space, str] = field(default_factory=dict)
    kinds: dict[Space, str] = field(default_factory=dict)  # space → what its structures are ("head", ...)
    defined: set[Space] = field(default_factory=set)
    rule_of: dict[str, str] = field(default_factory=dict)
    layout_cache: dict[str, Any] = field(default_factory=dict)  # node → (root, index tensor, literals, hard-coded ones)
    tensor_names: dict[int, str] = field(default_factory=dict)  # id(tensor) → its first qualified name


def value_infos(value: Any, key: str) -> list[tuple[str, TensorInfo]]:
    """(value_key, TensorInfo) for a node's value: itself, or each tensor element of a (nested) tuple."""
    if isinstance(value, TensorInfo):
        return [(key, value)]
    if isinstance(value, (tuple, list)):  # nested tuples (an LSTM's (h_n, c_n)) get keys "name.1.0"
        return [item for k, v in enumerate(value) for item in value_infos(v, f"{key}.{k}")]
    return []


class OpContext:
    """The view an op rule gets of one fx node, and the verbs it uses to declare couplings."""

    def __init__(self, traced: TracedModel, facts: GraphFacts, node: fx.Node, rule_kind: str) -> None:
        self.traced = traced
        self.facts = facts
        self.node = node
        self.rule_kind = rule_kind

    # ----- looking things up -------------------------------------------------------------
    @property
    def module(self) -> nn.Module:
        assert self.node.op == "call_module", "ctx.module is only defined for call_module nodes"
        return self.traced.graph_module.get_submodule(str(self.node.target))

    @property
    def module_name(self) -> str:
        return str(self.node.target)

    def value(self, arg: Any) -> Any:
        """The example value of an argument: TensorInfo for tensors, the Python value otherwise."""
        if isinstance(arg, fx.Node):
            return self.traced.values.get(arg.name)
        if isinstance(arg, (tuple, list)):
            return type(arg)(self.value(a) for a in arg)
        return arg

    def info(self, arg: Any) -> TensorInfo | None:
        v = self.value(arg)
        return v if isinstance(v, TensorInfo) else None

    @property
    def out_info(self) -> TensorInfo | None:
        v = self.traced.values.get(self.node.name)
        return v if isinstance(v, TensorInfo) else None

    def arg(self, index: int, name: str, default: Any = None) -> Any:
        """Positional-or-keyword argument of a call node."""
        if len(self.node.args) > index:
            return self.node.args[index]
        return self.node.kwargs.get(name, default)

    def tensor_args(self) -> list[fx.Node]:
        nodes = [a for a in self.node.all_input_nodes]
        return [a for a in nodes if isinstance(self.traced.values.get(a.name), TensorInfo)]

    def param_name(self, arg: Any) -> str | None:
        """Qualified name of the parameter or buffer an argument reads directly, if any."""
        if isinstance(arg, fx.Node) and arg.op == "get_attr":
            return str(arg.target)
        return None

    # ----- spaces -----------------------------------------------------------------------
    def space(self, arg: Any, dim: int, element: int | tuple[int, ...] | None = None) -> Space | None:
        """The channel space of dim ``dim`` of an argument node (or of tuple element ``element``;
        a tuple of indices for nested tuples: ``(1, 0)`` is an LSTM's h_n)."""
        if not isinstance(arg, fx.Node):
            return None
        value = self.traced.values.get(arg.name)
        key = arg.name
        for k in (() if element is None else (element,) if isinstance(element, int) else element):
            if not isinstance(value, (tuple, list)) or not -len(value) <= k < len(value):
                return None
            k %= len(value)
            value, key = value[k], f"{key}.{k}"
        if not isinstance(value, TensorInfo):
            return None
        if not -value.ndim <= dim < value.ndim:
            return None
        dim %= value.ndim
        width = value.shape[dim]
        if width <= 1:
            return None
        self.facts.widths[(key, dim)] = width
        return (key, dim)

    def out(self, dim: int, element: int | tuple[int, ...] | None = None) -> Space | None:
        return self.space(self.node, dim, element)

    def internal(self, name: str, width: int) -> Space | None:
        """A channel space inside this node with no traced value of its own (an LSTM's 4·H gate
        rows): it carries members (``out``/``bias`` roles only: it cannot be measured, so nothing
        may consume it) and couplings to the node's real spaces."""
        if width <= 1:
            return None
        space = (f"{self.node.name}.{name}", 0)
        self.facts.widths[space] = width
        self._define(space)
        return space

    def _define(self, s: Space) -> None:
        if s[0] == self.node.name or s[0].startswith(self.node.name + "."):
            self.facts.defined.add(s)

    # ----- declaring couplings ----------------------------------------------------------
    def same(self, a: Space | None, b: Space | None) -> None:
        """Channel i of ``a`` is channel i of ``b``."""
        if a is None or b is None:
            return
        wa, wb = self.facts.widths[a], self.facts.widths[b]
        if wa != wb:
            self.block(a, f"{self.describe()}: coupled widths differ ({wa} vs {wb})")
            self.block(b, f"{self.describe()}: coupled widths differ ({wa} vs {wb})")
            return
        self.facts.same.append((a, b))
        self._define(a)
        self._define(b)

    def pairs(self, a: Space | None, b: Space | None, ia: np.ndarray, ib: np.ndarray) -> None:
        """Channel ``ia[k]`` of ``a`` is channel ``ib[k]`` of ``b`` for every k."""
        if a is None or b is None:
            return
        ia, ib = np.asarray(ia, dtype=np.int64), np.asarray(ib, dtype=np.int64)
        if len(ia) > 1 and ia.shape == ib.shape:  # repeats (one per sequence position) are the same edge
            key = np.unique(ia * (int(ib.max(initial=0)) + 1) + ib)
            if len(key) < len(ia):
                ia, ib = np.divmod(key, int(ib.max(initial=0)) + 1)
        self.facts.pairs.append((a, b, ia, ib))
        self._define(a)
        self._define(b)

    def permute(self, a: Space | None, b: Space | None, perm: np.ndarray) -> None:
        """Channel j of ``b`` is channel ``perm[j]`` of ``a``."""
        if a is None or b is None:
            return
        perm = np.asarray(perm, dtype=np.int64)
        if np.array_equal(perm, np.arange(len(perm))):
            self.same(a, b)
        else:
            self.pairs(a, b, perm, np.arange(len(perm)))

    def merge(self, out: Space, factors: list[Space], coords: list[np.ndarray]) -> None:
        self.facts.merges.append(Merge(out, tuple(factors), tuple(coords), self.describe()))
        self._define(out)

    def member(self, space: Space | None, module: str, tensor: str, dim: int, role: str) -> None:
        """Declare that ``module.tensor`` dim ``dim`` is indexed by the channels of ``space``."""
        assert role in ROLES, role
        if space is None:
            return
        qualified = f"{module}.{tensor}" if module else tensor
        t = _lookup_tensor(self.traced.model, qualified)
        if t is None:
            return
        if t.shape[dim] != self.facts.widths[space]:
            self.block(space, f"{self.describe()}: {qualified} dim {dim} has size {t.shape[dim]}, "
                              f"not the {self.facts.widths[space]} channels it is coupled to")
            return
        qualified = self.tensor_name(t, qualified)
        self.facts.members.append(MemberSpec(space, qualified, dim, role, module))
        if role in ("out", "value"):
            self._define(space)

    def tensor_name(self, t: torch.Tensor, qualified: str) -> str:
        """The name a tensor is registered under first: a parameter shared by two modules (tied
        embeddings) is one member, sliced once, whichever module's name a rule used."""
        if not self.facts.tensor_names:
            model = self.traced.model
            for name, p in [*model.named_parameters(), *model.named_buffers()]:
                self.facts.tensor_names.setdefault(id(p), name)
        return self.facts.tensor_names.get(id(t), qualified)

    def param_member(self, arg: Any, dim: int, space: Space | None, role: str) -> bool:
        """Declare a member for a tensor argument read from a parameter; False if it is computed."""
        name = self.param_name(arg)
        if name is None:
            return False
        module, _, tensor = name.rpartition(".")
        self.member(space, module, tensor, dim, role)
        return True

    def block(self, space: Space | None, reason: str) -> None:
        """Channels of ``space`` cannot be pruned, for ``reason``."""
        if space is None:
            return
        self.facts.blocked.setdefault(space, []).append(reason)
        self._define(space)

    def fresh(self, space: Space | None, what: str = "") -> None:
        """The op creates this output dim itself (not from a parameter): it is not prunable."""
        self.block(space, what or f"{self.describe()} creates dim {space[1] if space else '?'} "
                                  "(not produced by a parameter)")

    def mark_inexact(self, space: Space | None, reason: str) -> None:
        """Removing even all-zero channels of ``space`` changes the output (e.g. LayerNorm stats)."""
        if space is None:
            return
        self.facts.inexact.setdefault(space, []).append(reason)

    def sink(self, space: Space | None, reason: str) -> None:
        """The op mixes this dim's channels into values without a parameter in between (a sum over
        channels, an activation × activation product): a removed channel must reach it as exactly
        zero, since no bias can absorb a constant there."""
        if space is not None:
            self.facts.sinks.setdefault(space, reason)

    def label(self, space: Space | None, kind: str) -> None:
        """Name what the structures of ``space``'s group are ("head", "kv_group", "rnn_unit", ...);
        adapters select groups by it. Unlabelled groups are "channel" groups."""
        if space is not None:
            self.facts.kinds.setdefault(space, kind)

    def block_all(self, reason: str) -> None:
        """Make every dim of every tensor input and output of this node a barrier."""
        for a in self.node.all_input_nodes:
            for key, info in value_infos(self.traced.values.get(a.name), a.name):
                for d in range(info.ndim):
                    s = self._space_of_key(key, d, info)
                    self.block(s, reason)
        for key, info in value_infos(self.traced.values.get(self.node.name), self.node.name):
            for d in range(info.ndim):
                self.block(self._space_of_key(key, d, info), reason)

    def _space_of_key(self, key: str, d: int, info: TensorInfo) -> Space | None:
        if info.shape[d] <= 1:
            return None
        self.facts.widths[(key, d)] = info.shape[d]
        return (key, d)

    @property
    def op_name(self) -> str:
        """The op's plain name: ``"mean"`` for ``x.mean``, ``torch.mean`` and ``aten.mean.dim``."""
        target = self.node.target
        if self.node.op == "call_method":
            return str(target)
        if isinstance(target, torch._ops.OpOverload):
            return target.overloadpacket.__name__
        return getattr(target, "__name__", str(target))

    def describe(self) -> str:
        n = self.node
        if n.op == "call_module":
            return f"{type(self.module).__name__} '{n.target}'"
        if n.op == "call_function":
            return f"{getattr(n.target, '__name__', n.target)}() at node '{n.name}'"
        return f"{n.op} {n.target!r} at node '{n.name}'"


def _lookup_tensor(model: nn.Module, qualified: str) -> torch.Tensor | None:
    try:
        t = get_tensor(model, qualified)
    except AttributeError:  # no such submodule or attribute
        return None
    return t if isinstance(t, torch.Tensor) else None
