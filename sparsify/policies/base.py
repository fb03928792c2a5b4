"""Policies turn importance vectors into zeros: learned soft thresholds, schedules, masks."""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from sparsify.adapters.base import ImportanceVector
from sparsify.errors import SparsifyError
from sparsify.graph.cost import MacsModel
from sparsify.prune.surgery import protect_members
from sparsify.registry import Registry


class PolicyConfig(BaseModel):
    """Base of policy configs; subclasses set ``kind`` to a Literal."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: str


@dataclass
class GroupView:
    """The vectors that cover one channel group, with the group's per-structure costs."""

    name: str
    width: int
    vectors: list[ImportanceVector]
    params: np.ndarray
    macs: np.ndarray
    shape: tuple[int, ...]  # shape of the group's first producing weight (for ERK)

    def magnitude(self) -> np.ndarray:
        """Per structure, the largest |raw| over the group's vectors (a structure goes only when
        every vector drops it)."""
        out = np.zeros(self.width)
        for v in self.vectors:
            with torch.no_grad():
                mag = v.raw().detach().abs().double().cpu().numpy()
            if not np.isfinite(mag).all():
                raise SparsifyError(
                    f"importance vector '{v.name}' has {int((~np.isfinite(mag)).sum())} NaN/inf entries: training "
                    "has diverged (lower the learning rate, check the loss) or the model was loaded with bad weights")
            np.maximum.at(out, v.entries, mag)
        return out


class Policy(abc.ABC):
    """Base class of policies: ``attach`` installs transforms, ``step`` updates them."""

    kind: ClassVar[str]
    config: PolicyConfig

    def __init__(self, config: PolicyConfig) -> None:
        self.config = config
        self.groups: list[GroupView] = []
        self.cost_model: MacsModel | None = None  # set by the Sparsifier before attach: exact MACs of a plan

    def keep_vectors(self) -> dict[int, np.ndarray]:
        """Per group id, the structures some vector still keeps (effective value non-zero)."""
        with torch.no_grad():  # one device→host copy for all vectors (a sync per vector stalls a GPU)
            return self.keep_from_nonzero((self.effective_flat() != 0).cpu().numpy())

    def effective_flat(self) -> torch.Tensor:
        """Every vector's effective value, concatenated in group order (policies may batch this)."""
        values = [v.effective().detach().flatten() for g in self.groups for v in g.vectors]
        return torch.cat([t.to(values[0].device) for t in values])

    def keep_from_nonzero(self, nonzero: np.ndarray) -> dict[int, np.ndarray]:
        """Per group id, the structures kept, from one flag per vector entry (in ``effective_flat`` order)."""
        structure, bounds = self.flat_structures()
        alive = np.zeros(bounds[-1], dtype=bool)
        alive[structure[nonzero]] = True  # a structure lives if any vector entry covering it does
        return {g.vectors[0].group.id: alive[a:b] for g, a, b in zip(self.groups, bounds[:-1], bounds[1:], strict=True)}

    def flat_structures(self) -> tuple[np.ndarray, np.ndarray]:
        """Per vector entry (``effective_flat`` order) its structure's index in all groups' structures laid
        end to end, and the groups' bounds there (made once)."""
        if "_flat_structures_cache" not in self.__dict__:
            bounds = np.cumsum([0] + [g.width for g in self.groups])
            structure = np.concatenate([np.asarray(v.entries) + start
                                        for g, start in zip(self.groups, bounds, strict=False) for v in g.vectors])
            self._flat_structures_cache = (structure, bounds)
        return self._flat_structures_cache

    @abc.abstractmethod
    def attach(self, groups: Sequence[GroupView]) -> None:
        """Create a transform per vector and install it with ``vector.adapter.install``."""

    def step(self, step: int) -> None:  # noqa: B027 (optional hook)
        """Called by ``Sparsifier.step()`` after each optimizer step; ``step`` counts from 1."""

    def finalize(self) -> None:  # noqa: B027 (optional hook)
        """Called by ``Sparsifier.prune()`` before zeros are read (e.g. a final global threshold)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None


class Connectivity:
    """``Sparsifier.prune()``'s rule that keeps the network connected: a group that would lose every
    structure keeps its strongest (by ``magnitude``), and so does every member layer it would empty
    (one branch of a concat). Vectorised over all groups (it runs inside the STR controller's search)."""

    def __init__(self, groups: Sequence[GroupView]) -> None:
        self.groups = list(groups)
        self.ids = [g.vectors[0].group.id for g in self.groups]
        self.widths = np.asarray([g.width for g in self.groups], dtype=np.int64)
        self.starts = np.cumsum(self.widths) - self.widths
        index, lengths, owner = [], [], []
        for i, g in enumerate(self.groups):
            for m in g.vectors[0].group.members:
                mine = np.unique(m.structure_of)
                if len(mine):
                    index.append(mine + self.starts[i])
                    lengths.append(len(mine))
                    owner.append(i)
        self.member_index = np.concatenate(index) if index else np.zeros(0, dtype=np.int64)
        self.member_lengths = np.asarray(lengths, dtype=np.int64)
        self.member_starts = np.cumsum(self.member_lengths) - self.member_lengths
        self.member_owner = np.asarray(owner, dtype=np.int64)

    def apply(self, keep: dict[int, np.ndarray], magnitude: Callable[[GroupView], np.ndarray]
              ) -> tuple[dict[int, np.ndarray], list[str]]:
        """The keep vectors after the rule, and the names of the groups it changed."""
        out, changed = dict(keep), []
        flat = np.concatenate([keep.get(gid, np.ones(w, dtype=bool)) for gid, w in zip(self.ids, self.widths,
                                                                                       strict=True)])
        nonempty = np.logical_or.reduceat(flat, self.starts) if len(flat) else np.zeros(0, dtype=bool)
        for i in np.flatnonzero(~nonempty & (self.widths > 0)):
            g = self.groups[i]
            k = flat[self.starts[i]:self.starts[i] + self.widths[i]]  # a view: the fix shows in `flat`
            k[int(np.argmax(magnitude(g)))] = True
            changed.append(g.name)
        if len(self.member_starts):
            counts = np.add.reduceat(flat[self.member_index], self.member_starts, dtype=np.int64)
            for i in np.unique(self.member_owner[counts == 0]):  # rare: look closer only there
                g = self.groups[i]
                k = flat[self.starts[i]:self.starts[i] + self.widths[i]]
                removed, _ = protect_members(g.vectors[0].group, np.flatnonzero(~k), magnitude(g))
                k[:] = True
                k[removed] = False
                changed.append(g.name)
        for i, gid in enumerate(self.ids):
            if gid in keep:
                out[gid] = flat[self.starts[i]:self.starts[i] + self.widths[i]].copy()
        return out, changed


class Mask(nn.Module):
    """raw · mask, with a 0/1 mask buffer (all ones at first)."""

    def __init__(self, size: int, device: torch.device | None = None) -> None:
        super().__init__()
        self.register_buffer("mask", torch.ones(size, device=device))

    def forward(self, raw: torch.Tensor) -> torch.Tensor:
        return raw * self.mask.to(raw.dtype)

    def constant_factor(self) -> torch.Tensor:
        """effective / raw, whatever raw is: the mask itself."""
        return self.mask


def set_group_masks(group: GroupView, keep: np.ndarray) -> None:
    """Write a per-structure keep vector (bool) into the Mask transforms of the group's vectors."""
    for v in group.vectors:
        assert isinstance(v.transform, Mask)
        m = torch.as_tensor(keep[v.entries], dtype=v.transform.mask.dtype)
        v.transform.mask.copy_(m.to(v.transform.mask.device))


def top_k_keep(magnitude: np.ndarray, k: int) -> np.ndarray:
    """Boolean keep vector for the k largest entries (ties broken by index)."""
    keep = np.zeros(len(magnitude), dtype=bool)
    keep[np.argsort(-magnitude, kind="stable")[:k]] = True
    return keep


POLICIES: Registry[tuple[type[PolicyConfig], type[Policy]]] = Registry(
    "policy", "Register one with sparsify.extend.register_policy(kind, config_cls, policy_cls)."
)


def register_policy(kind: str, config_cls: type[PolicyConfig], policy_cls: type[Policy],
                    *, override: bool = False) -> None:
    """Register a policy kind: its pydantic config class and its implementation."""
    POLICIES.register_plugin(kind, config_cls, policy_cls, Policy, override=override)


def list_policies() -> list[str]:
    return POLICIES.list()


def make_policy(config: PolicyConfig) -> Policy:
    _, cls = POLICIES.get(config.kind)
    return cls(config)
