"""Policies turn importance vectors into zeros: learned soft thresholds, schedules, masks."""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, model_validator
from torch import nn

from sparsify._utils import get_tensor
from sparsify._validation import refuse_bool_numbers
from sparsify.adapters.base import ImportanceVector
from sparsify.errors import SparsifyError
from sparsify.graph.channel_graph import ChannelGraph, ChannelGroup
from sparsify.graph.cost import MacsModel
from sparsify.measure.latency_model import LatencyModel
from sparsify.registry import PluginRegistry


class PolicyConfig(BaseModel):
    """Base of policy configs; subclasses set ``kind`` to a Literal. Floats must be finite and numbers
    not booleans (``sparsify._validation``), in every subclass too."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    kind: str

    @model_validator(mode="before")
    @classmethod
    def _no_bool_numbers(cls, data: Any) -> Any:
        return refuse_bool_numbers(cls, data)


@dataclass(frozen=True)
class PolicyContext:
    """What a policy gets from the Sparsifier besides the groups (``Policy.attach(groups, context)``)."""

    cost_model: MacsModel | None = None  # the network's exact MACs after a plan (unit="macs" targets)
    latency_model: LatencyModel | None = None  # estimated latency after a plan (GMP's budget="latency")
    round_to: int | None = None  # SparsifierConfig.round_to: prune() keeps widths at multiples of it


@dataclass
class GroupView:
    """The vectors that cover one channel group, with the group's per-structure costs."""

    name: str
    width: int
    vectors: list[ImportanceVector]
    params: np.ndarray
    macs: np.ndarray
    shape: tuple[int, ...]  # shape of the group's first producing weight (for ERK)

    @property
    def group(self) -> ChannelGroup:
        return self.vectors[0].group

    @property
    def id(self) -> int:
        return self.vectors[0].group.id

    def magnitude(self) -> np.ndarray:
        """Per structure, the largest |raw| over the group's vectors (a structure goes only when
        every vector drops it)."""
        return structure_magnitude(self.width, self.vectors)


def structure_magnitude(width: int, vectors: Sequence[ImportanceVector]) -> np.ndarray:
    """Per structure of a group of ``width``, the largest |raw| over ``vectors`` (0 where none covers it)."""
    out = np.zeros(width)
    for v in vectors:
        with torch.no_grad():
            mag = v.raw().detach().abs().double().cpu().numpy()
        if not np.isfinite(mag).all():
            raise SparsifyError(
                f"importance vector '{v.name}' has {int((~np.isfinite(mag)).sum())} NaN/inf entries: training "
                "has diverged (lower the learning rate, check the loss) or the model was loaded with bad weights")
        np.maximum.at(out, v.entries, mag)
    return out


def producer_shape(graph: ChannelGraph, group: ChannelGroup) -> tuple[int, ...]:
    """Shape of the group's first producing weight (what ERK budgets read)."""
    producer = next((m for m in group.members if m.role in ("out", "value")), group.members[0])
    return tuple(get_tensor(graph.model, producer.tensor).shape)


class Policy(abc.ABC):
    """Base class of policies: ``attach`` installs transforms, ``step`` updates them.

    Every hook a Sparsifier calls is declared here, with a default: ``step``, ``finalize``,
    ``batched_effective`` (None), ``thresholds`` ({}), ``state_dict`` / ``load_state_dict``.
    """

    kind: ClassVar[str]
    config: PolicyConfig

    def __init__(self, config: PolicyConfig) -> None:
        self.config = config
        self.groups: list[GroupView] = []
        self.context = PolicyContext()  # attach stores the Sparsifier's

    def keep_vectors(self) -> dict[int, np.ndarray]:
        """Per group id, the structures some vector still keeps (effective value non-zero)."""
        with torch.no_grad():  # one device→host copy for all vectors (a sync per vector stalls a GPU)
            return self.keep_from_nonzero((self.effective_flat() != 0).cpu().numpy())

    def effective_flat(self) -> torch.Tensor:
        """Every vector's effective value, concatenated in group order (``batched_effective`` where it can)."""
        batched = self.batched_effective()
        if batched is not None:
            return batched[0].detach()
        values = [v.effective().detach().flatten() for g in self.groups for v in g.vectors]
        return torch.cat([t.to(values[0].device) for t in values])

    def keep_from_nonzero(self, nonzero: np.ndarray) -> dict[int, np.ndarray]:
        """Per group id, the structures kept, from one flag per vector entry (in ``effective_flat`` order)."""
        structure, bounds = self.flat_structures()
        alive = np.zeros(bounds[-1], dtype=bool)
        alive[structure[nonzero]] = True  # a structure lives if any vector entry covering it does
        return {g.id: alive[a:b] for g, a, b in zip(self.groups, bounds[:-1], bounds[1:], strict=True)}

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
    def attach(self, groups: Sequence[GroupView], context: PolicyContext) -> None:
        """Create a transform per vector and install it with ``vector.adapter.install``; keep ``groups``
        in ``self.groups`` and ``context`` in ``self.context``. Raise here if the context lacks what the
        config needs (a latency model, say)."""

    def batched_effective(self) -> tuple[torch.Tensor, list[int]] | None:
        """Every vector's effective value from one chain of kernels (concatenated, in group order) and the
        vectors' lengths; None (the default) if the policy does not batch (each transform computes its own)."""
        return None

    def thresholds(self) -> dict[str, float]:
        """A threshold per vector name, for ``Sparsifier.report()``; {} (the default) if the policy has none."""
        return {}

    def step(self, step: int) -> None:  # noqa: B027 (optional hook)
        """Called by ``Sparsifier.step()`` after each optimizer step; ``step`` counts from 1."""

    def finalize(self) -> None:  # noqa: B027 (optional hook)
        """Called by ``Sparsifier.prune()`` before zeros are read (e.g. a final global threshold)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None


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


POLICIES = PluginRegistry(
    "policy", "Register one with sparsify.extend.register_policy(kind, config_cls, policy_cls).", Policy
)
register_policy = POLICIES.register_plugin
"""Register a policy kind with its pydantic config class: ``register_policy(kind, config_cls, policy_cls)``,
or ``@register_policy(kind, config_cls)`` above the class."""
list_policies = POLICIES.list
make_policy = POLICIES.make
