"""Adapters expose prunable structures as importance vectors.

An :class:`ImportanceVector` is one vector of structures (the channels of one BN, the filters of one
group, the ranks of one factorisation, ...). Its ``raw()`` value is what a policy sparsifies. The
policy's *transform* is an ``nn.Module`` mapping raw → effective (a soft threshold with a learnable
threshold, a mask); the adapter installs it into the model with ``torch.nn.utils.parametrize`` as a
submodule (so its parameters are among ``model.parameters()``), the network computes with the
effective vector, and an effective zero removes its structure exactly.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, model_validator
from torch import nn
from torch.nn.utils import parametrize

from sparsify._validation import refuse_bool_numbers
from sparsify.graph.channel_graph import ChannelGraph, ChannelGroup
from sparsify.registry import PluginRegistry


class AdapterConfig(BaseModel):
    """Base of adapter configs; subclasses set ``kind`` to a Literal. Floats must be finite and numbers
    not booleans (``sparsify._validation``), in every subclass too."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    kind: str

    @model_validator(mode="before")
    @classmethod
    def _no_bool_numbers(cls, data: Any) -> Any:
        return refuse_bool_numbers(cls, data)


@dataclass(eq=False)
class ImportanceVector:
    """A vector of structures: entry i is structure ``entries[i]`` of ``group``."""

    name: str
    group: ChannelGroup
    entries: np.ndarray
    adapter: Adapter
    handle: Any = None  # adapter-private data (the BN module, the member list, ...)
    transform: nn.Module | None = None
    params_per_entry: np.ndarray = field(default_factory=lambda: np.zeros(0))
    macs_per_entry: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def __len__(self) -> int:
        return len(self.entries)

    def raw(self) -> torch.Tensor:
        """The vector the policy acts on (differentiable)."""
        return self.adapter.raw(self)

    def effective(self) -> torch.Tensor:
        """The vector the model computes with; exact zeros mark removable entries."""
        raw = self.raw()
        return raw if self.transform is None else self.transform(raw)


class Adapter(abc.ABC):
    """Turns channel groups into importance vectors and installs a policy's transform."""

    kind: ClassVar[str]
    config: AdapterConfig

    def __init__(self, config: AdapterConfig) -> None:
        self.config = config
        self.skipped: dict[str, str] = {}  # group name → why this adapter does not cover it

    @abc.abstractmethod
    def vectors(self, cg: ChannelGraph) -> list[ImportanceVector]:
        """One vector per structure set this adapter covers; record others in ``self.skipped``."""

    @abc.abstractmethod
    def raw(self, vector: ImportanceVector) -> torch.Tensor:
        """The current raw (pre-policy) value of ``vector``."""

    @abc.abstractmethod
    def install(self, vector: ImportanceVector, transform: nn.Module) -> None:
        """Make the model compute with ``transform(raw)`` in place of ``raw``; register ``transform``
        as a submodule of the installed parametrization."""

    def bake(self, vector: ImportanceVector) -> list[Baked]:
        """Remove the installed parametrizations, leaving the effective values in the tensors.

        Returns what ``unbake`` needs to put them back exactly (the tensors keep their identity,
        so optimizers keep working)."""
        targets = [(m, n) for m, n in self.parametrized(vector) if parametrize.is_parametrized(m, n)]
        with torch.no_grad():
            values = [getattr(m, n).detach().clone() for m, n in targets]  # before any removal
        baked = []
        for (module, name), value in zip(targets, values, strict=True):
            plist = module.parametrizations[name]
            param = plist.original
            baked.append(Baked(module, name, list(plist), param, param.data))
            parametrize.remove_parametrizations(module, name, leave_parametrized=False)
            param.data = value.to(param.dtype)
        return baked

    def factor(self, vector: ImportanceVector) -> torch.Tensor:
        """Per structure, effective / raw: what ``StructureFactor`` parametrizations multiply by."""
        return effective_over_raw(vector)

    def parametrized_values(self, vector: ImportanceVector, effective: torch.Tensor
                            ) -> list[tuple[nn.Module, str, torch.Tensor]] | None:
        """What each of ``install``'s parametrizations returns, given the vector's effective value
        computed elsewhere (batched); None if this adapter cannot say (then they compute as usual)."""
        return None

    def batched_parametrized_values(self, vectors: list[ImportanceVector], effective: torch.Tensor,
                                    sizes: list[int]) -> list[tuple[nn.Module, str, torch.Tensor]] | None:
        """``parametrized_values`` for many vectors at once from their concatenated effective values
        (one kernel per derived tensor instead of one per vector); by default, vector by vector."""
        out = []
        for v, eff in zip(vectors, effective.split(sizes), strict=True):
            values = self.parametrized_values(v, eff)
            if values is None:
                return None
            out.extend(values)
        return out

    @abc.abstractmethod
    def parametrized(self, vector: ImportanceVector) -> list[tuple[nn.Module, str]]:
        """The (module, tensor name) pairs ``install`` parametrizes, in baking order."""


@dataclass
class Baked:
    """A parametrization removed by ``bake``: enough to restore it bit-identically."""

    module: nn.Module
    name: str
    parametrizations: list[nn.Module]
    param: torch.Tensor
    data: torch.Tensor

    def restore(self) -> None:
        self.param.data = self.data
        for p in self.parametrizations:
            parametrize.register_parametrization(self.module, self.name, p, unsafe=True)


def effective_over_raw(vector: ImportanceVector) -> torch.Tensor:
    """Per entry, effective / raw: the factor that scales a structure's tensors (1 without a
    transform, 0 where raw is 0). For adapters whose raw vector is a computed magnitude.

    A transform with a ``constant_factor()`` (a 0/1 mask) gives it directly: the magnitudes are not
    recomputed in every forward (the factor of a mask does not depend on them)."""
    constant = getattr(vector.transform, "constant_factor", None)
    if constant is not None:
        return constant()
    raw = vector.raw()
    if vector.transform is None:
        return torch.ones_like(raw)
    eff = vector.transform(raw)
    return torch.where(raw > 0, eff / raw.clamp_min(torch.finfo(raw.dtype).tiny), torch.zeros_like(raw))


class StructureFactor(nn.Module):
    """Parametrization t ↦ t · factor[index] along ``dim``: the vector's per-structure factor
    (``vector.adapter.factor``, effective / raw) spread over the indices of one tensor dim."""

    def __init__(self, vector: ImportanceVector, dim: int, index: torch.Tensor, ndim: int) -> None:
        super().__init__()
        object.__setattr__(self, "vector", vector)  # plain reference: not a submodule
        self.transform = vector.transform  # shared by all of the vector's tensors
        self.dim, self.ndim = dim, ndim
        self.register_buffer("index", index, persistent=False)
        # index i → structure i (a conv's own filters): the factor is used as it is, no gather (and no scatter
        # in the backward) per tensor and forward
        self.identity = len(index) == len(vector) and bool(torch.equal(index.cpu(), torch.arange(len(vector))))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.scale(t, per_forward(self.vector, "factor", lambda: self.vector.adapter.factor(self.vector)))

    def scale(self, t: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
        """``t`` times the per-structure ``factor`` spread over this parametrization's dim."""
        shape = [1] * self.ndim
        shape[self.dim] = -1
        return t * (factor if self.identity else factor[self.index]).to(t.dtype).view(shape)


def per_forward(owner: object, what: str, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``compute()``, once per forward inside ``parametrize.cached()`` (``Sparsifier.cached``) and kept with the
    parametrized tensors until the context ends; outside it, computed at every call. For values that every
    parametrization of a vector reads (its raw norms, its factor): each was recomputed per tensor before."""
    if not parametrize._cache_enabled:
        return compute()
    key = (id(owner), f"sparsify:{what}")  # no module attribute has this name: no clash with the tensors' keys
    value = parametrize._cache.get(key)
    if value is None:
        value = parametrize._cache[key] = compute()
    return value


def original(module: nn.Module, name: str) -> torch.Tensor:
    """A tensor's stored value, beneath any parametrization."""
    if parametrize.is_parametrized(module, name):
        return module.parametrizations[name].original
    return getattr(module, name)


ADAPTERS = PluginRegistry(
    "adapter", "Register one with sparsify.extend.register_adapter(kind, config_cls, adapter_cls).", Adapter
)
register_adapter = ADAPTERS.register_plugin
"""Register an adapter kind with its pydantic config class: ``register_adapter(kind, config_cls, adapter_cls)``,
or ``@register_adapter(kind, config_cls)`` above the class."""
list_adapters = ADAPTERS.list
make_adapter = ADAPTERS.make
