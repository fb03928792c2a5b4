"""``rnn_units``: importance of an RNN hidden unit = L2 norm of its gate rows.

One vector per layer and direction of every ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` in a group of
hidden units (``ChannelGroup.kind == "rnn_unit"``). Entry j is unit j; its raw value is
‖(rows j, H+j, 2H+j, 3H+j of weight_ih and of weight_hh)‖₂, the unit's incoming weights (biases are
left out: they do not say how much the unit listens to its inputs). LSTM projections (``proj_size``)
get one vector per layer and direction too, the norm of the ``weight_hr`` rows. An ``nn.LSTMCell`` /
``nn.GRUCell`` / ``nn.RNNCell`` (all its calls in a loop are one group) gets one vector, named after it.

The policy's transform acts as a factor effective/raw per unit on the unit's weight rows *and*
biases of that layer and direction, so an effective zero zeroes all of them and the unit's output
is exactly 0 (see ``sparsify/graph/rules/rnn.py``). A unit is removed when every layer's vector is
zero there (``nn.LSTM`` has one hidden_size for all layers). Other producers coupled with the units
(a layer that computes the initial state) get one more vector, their rows' L2 norm.

``nn.RNNBase.forward`` re-reads its weights when they are not the tensors it last used, which a
parametrized weight never is, so forward computes with the effective weights (tested).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import Field
from torch import nn
from torch.nn.utils import parametrize

from sparsify.adapters.base import (
    Adapter,
    AdapterConfig,
    ImportanceVector,
    StructureFactor,
    original,
    register_adapter,
)
from sparsify.graph.channel_graph import ChannelGraph, ChannelGroup, Member
from sparsify.graph.rules.rnn import GATES
from sparsify.graph.rules.rnn_cells import cell_gates

#: (module, tensor name, dim, index): index i of that dim belongs to entry ``index[i]`` of a vector.
Slot = tuple[nn.Module, str, int, np.ndarray]


class RNNUnitsConfig(AdapterConfig):
    """Importance of an RNN hidden unit = L2 norm of its gate rows (weight_ih and weight_hh), per layer."""

    kind: Literal["rnn_units"] = "rnn_units"
    projections: bool = Field(
        True, description="also cover LSTM projection channels (proj_size > 0): importance = L2 norm of a "
                          "weight_hr row")


class RNNUnitsAdapter(Adapter):
    """Covers the exact, prunable groups of RNN hidden units (and LSTM projections)."""

    config: RNNUnitsConfig

    def vectors(self, cg: ChannelGraph) -> list[ImportanceVector]:
        kinds = ("rnn_unit", "rnn_proj") if self.config.projections else ("rnn_unit",)
        out: list[ImportanceVector] = []
        for group in cg.groups:
            if group.kind not in kinds:
                continue
            reason = _unsupported(group)
            if reason:
                self.skipped[group.name] = reason
                continue
            found = self._group_vectors(cg, group)
            if not found:
                self.skipped[group.name] = "no nn.RNN/LSTM/GRU (or cell) weight produces these channels"
            out.extend(found)
        if not out and not self.skipped:
            self.skipped["(model)"] = "no nn.RNN/LSTM/GRU hidden units in the channel graph"
        return out

    def _group_vectors(self, cg: ChannelGraph, group: ChannelGroup) -> list[ImportanceVector]:
        out, others = [], []
        for m in group.members:
            module = cg.model.get_submodule(m.module)
            attr = m.tensor.rpartition(".")[2]
            if not isinstance(module, (nn.RNNBase, nn.RNNCellBase)):
                others.append(m)
            elif m.role != "out":
                continue
            elif attr.startswith("weight_ih") and group.kind == "rnn_unit":
                out.append(self._layer_vector(group, module, m, attr.removeprefix("weight_ih")))
            elif attr.startswith("weight_hr_") and group.kind == "rnn_proj":
                layer = attr.removeprefix("weight_hr_")
                slots = [(module, attr, 0, np.arange(module.proj_size))]
                out.append(ImportanceVector(f"{m.module}.{layer}.proj", group, m.structure_of, self,
                                            handle={"norm": slots, "scaled": slots}))
        producers = [m for m in others if m.role in ("out", "value")]
        if out and producers:  # e.g. a Linear computing h0: zeroed with the units, or they would not start at 0
            scaled = [m for m in others if m.role in ("out", "value", "scale", "bias")]
            name = f"{group.name}/initial state"
            out.append(ImportanceVector(name, group, np.arange(group.width), self, handle={
                "norm": [_slot(cg, m) for m in producers], "scaled": [_slot(cg, m) for m in scaled]}))
        return out

    def _layer_vector(self, group: ChannelGroup, module: nn.RNNBase | nn.RNNCellBase, ih: Member, layer: str
                      ) -> ImportanceVector:
        """``layer`` is the weights' suffix: ``_l0``, ``_l1_reverse``, … (nn.LSTM), ``""`` (a cell)."""
        hidden = module.hidden_size
        gates = GATES[module.mode] if isinstance(module, nn.RNNBase) else cell_gates(module)
        entries = ih.structure_of[:hidden]
        local = np.arange(gates * hidden) % hidden  # row r of a gate-blocked tensor is unit r mod H
        if not np.array_equal(entries[local], ih.structure_of):
            raise AssertionError(f"{ih.tensor}: gate rows are not coupled as j, H+j, 2H+j, ...")
        names = [f"weight_ih{layer}", f"weight_hh{layer}"]
        norm = [(module, n, 0, local) for n in names]
        scaled = norm + [(module, n, 0, local) for n in (f"bias_ih{layer}", f"bias_hh{layer}")
                         if getattr(module, n, None) is not None]
        name = ".".join(filter(None, (ih.tensor.rpartition(".")[0], layer.removeprefix("_"))))
        return ImportanceVector(name, group, entries, self, handle={"norm": norm, "scaled": scaled})

    def raw(self, vector: ImportanceVector) -> torch.Tensor:
        total = None
        for module, name, dim, index in vector.handle["norm"]:
            t = original(module, name)
            rows = t.movedim(dim, 0).flatten(1).pow(2).sum(1)
            per_entry = torch.zeros(len(vector), dtype=rows.dtype, device=rows.device)
            per_entry = per_entry.index_add(0, _index(vector, index, name, t.device), rows)
            total = per_entry if total is None else total + per_entry.to(total.device)
        positive = total > 0  # sqrt has an infinite slope at 0: keep gradients finite for all-zero units
        return torch.where(positive, total.clamp_min(torch.finfo(total.dtype).tiny).sqrt(), torch.zeros_like(total))

    def install(self, vector: ImportanceVector, transform: nn.Module) -> None:
        vector.transform = transform
        for module, name, dim, index in vector.handle["scaled"]:
            t = getattr(module, name)
            factor = StructureFactor(vector, dim, _index(vector, index, name, t.device), t.ndim)
            parametrize.register_parametrization(module, name, factor, unsafe=True)

    def parametrized(self, vector: ImportanceVector) -> list[tuple[nn.Module, str]]:
        return [(module, name) for module, name, _, _ in vector.handle["scaled"]]


def _slot(cg: ChannelGraph, m: Member) -> Slot:
    module_name, _, attr = m.tensor.rpartition(".")
    return (cg.model.get_submodule(module_name) if module_name else cg.model), attr, m.dim, m.structure_of


def _index(vector: ImportanceVector, index: np.ndarray, name: str, device: torch.device) -> torch.Tensor:
    """``index`` as a tensor on ``device``, made once (no host copy per forward)."""
    cache = vector.handle.setdefault("index", {})
    key = (name, id(index), str(device))
    if key not in cache:
        cache[key] = torch.as_tensor(index, device=device)
    return cache[key]


def _unsupported(group: ChannelGroup) -> str:
    if not group.prunable:
        initial = [r for r in group.blocked if "initial state" in r]  # the most specific reason first
        return (initial or [group.why_not()])[0]
    if not group.exact:
        return f"removing units changes the network's function even when they are zero: {group.inexact[0]}"
    return ""


register_adapter("rnn_units", RNNUnitsConfig, RNNUnitsAdapter)
