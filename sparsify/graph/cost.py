"""Parameter and multiply-accumulate (MAC) counts, per module and per channel structure."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from sparsify.graph.channel_graph import ChannelGraph, ChannelGroup
from sparsify.graph.trace import TensorInfo, TracedModel

_aten = torch.ops.aten
_CELL_OPS = (_aten.lstm_cell.default, _aten.gru_cell.default, _aten.rnn_tanh_cell.default, _aten.rnn_relu_cell.default)
_RNN_OPS = (_aten.lstm.input, _aten.gru.input, _aten.rnn_tanh.input, _aten.rnn_relu.input)


def module_macs(traced: TracedModel) -> dict[str, int]:
    """MACs per example (batch dim 0 divided out) of every conv/linear/RNN(-cell) call in the trace, keyed by
    the qualified name of the weight it multiplies."""
    macs: dict[str, int] = {}
    gm = traced.graph_module
    for node in gm.graph.nodes:
        out = traced.values.get(node.name)
        if node.op == "call_module" and isinstance(m := gm.get_submodule(str(node.target)), nn.RNNBase):
            _rnn_macs(macs, str(node.target), m, out)
            continue
        if _cell_macs(macs, traced, node):
            continue
        if node.op == "call_function" and node.target in _RNN_OPS and isinstance(node.args[2], (list, tuple)):
            first = node.args[2][0]  # torch.export's nn.LSTM/GRU/RNN: its flat weights name the module
            name = str(first.target).rpartition(".")[0] if isinstance(first, fx.Node) else ""
            if isinstance(m := traced.model.get_submodule(name) if name else None, nn.RNNBase):
                _rnn_macs(macs, name, m, out)
            continue
        if not isinstance(out, TensorInfo) or not out.shape:
            continue
        per_example = math.prod(out.shape[1:]) if len(out.shape) > 1 else out.shape[0]
        if node.op == "call_module":
            m = gm.get_submodule(str(node.target))
            if isinstance(m, nn.modules.conv._ConvNd):
                fan_in = m.weight.shape[1] * math.prod(m.kernel_size) if not m.transposed else (
                    m.weight.shape[0] // m.groups * math.prod(m.kernel_size))
                key = f"{node.target}.weight"
                macs[key] = macs.get(key, 0) + per_example * fan_in
            elif isinstance(m, nn.Linear):
                key = f"{node.target}.weight"
                macs[key] = macs.get(key, 0) + per_example * m.in_features
        elif node.op == "call_function" and getattr(node.target, "__name__", "").split(".")[0] in (
                "linear", "conv1d", "conv2d", "conv3d"):  # torch functions and ATen overloads (linear.default)
            weight = node.args[1]
            if isinstance(weight, fx.Node) and weight.op == "get_attr":
                w = traced.values.get(weight.name)
                if isinstance(w, TensorInfo):
                    key = str(weight.target)
                    macs[key] = macs.get(key, 0) + per_example * math.prod(w.shape[1:])
    return macs


def _rnn_macs(macs: dict[str, int], name: str, module: nn.RNNBase, out: object) -> None:
    """nn.RNN / nn.LSTM / nn.GRU: every time step multiplies each ``weight_ih``, ``weight_hh`` and
    ``weight_hr`` (layer, direction) by one vector, i.e. ``numel`` MACs per sequence and step.

    The output (T, N, F), (N, T, F) with ``batch_first`` or (T, F) unbatched holds one row per step
    and sequence; like the other entries, its dim 0 is divided out (a Linear applied to the same
    time-first tensor counts N rows too), so the RNN's share of the network's MACs is right either way.
    A PackedSequence runs only the valid steps: their number divided by the batch size.
    """
    output = out[0] if isinstance(out, (tuple, list)) and out else out
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], TensorInfo):  # a PackedSequence
        h_n = out[1][0] if isinstance(out[1], (tuple, list)) else out[1]
        batch = h_n.shape[1] if isinstance(h_n, TensorInfo) and h_n.ndim == 3 else 1
        rows = round(output[0].shape[0] / batch)  # valid steps per sequence, on average
    elif not isinstance(output, TensorInfo) or output.ndim not in (2, 3):
        return
    else:
        rows = math.prod(output.shape[1:-1])  # N (time first), T (batch first) or 1 (unbatched) per dim-0 row
    for weight in module._flat_weights_names:
        if weight.startswith("weight_"):
            key = f"{name}.{weight}"
            macs[key] = macs.get(key, 0) + rows * getattr(module, weight).numel()


def _cell_macs(macs: dict[str, int], traced: TracedModel, node: fx.Node) -> bool:
    """nn.LSTMCell / GRUCell / RNNCell (fx) or their ATen ops (torch.export): one step, i.e. ``numel`` MACs of
    ``weight_ih`` and ``weight_hh`` per example and call (a loop over T steps has T calls). True if a cell."""
    if node.op == "call_module" and isinstance(m := traced.graph_module.get_submodule(str(node.target)),
                                               nn.RNNCellBase):
        weights = {f"{node.target}.{n}": getattr(m, n).numel() for n in ("weight_ih", "weight_hh")}
    elif node.op == "call_function" and node.target in _CELL_OPS:
        weights = {}
        for w in node.args[2:4]:
            info = traced.values.get(w.name) if isinstance(w, fx.Node) and w.op == "get_attr" else None
            if isinstance(info, TensorInfo):
                weights[str(w.target)] = math.prod(info.shape)
    else:
        return False
    for key, n in weights.items():
        macs[key] = macs.get(key, 0) + n
    return True


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def structure_costs(cg: ChannelGraph, group: ChannelGroup, macs: dict[str, int] | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(params, MACs) that removing each structure of ``group`` saves, to first order.

    Each member contributes its tensor's size per index; each conv/linear member contributes its
    MACs per index of the sliced dim. Savings shared with a neighbouring group that is pruned too
    are counted by both (the usual first-order estimate).
    """
    macs = module_macs(cg.traced) if macs is None else macs
    params = np.zeros(group.width)
    flops = np.zeros(group.width)
    model = cg.model
    for m in group.members:
        module_name, _, attr = m.tensor.rpartition(".")
        module = model.get_submodule(module_name) if module_name else model
        t = getattr(module, attr)
        counts = np.bincount(m.structure_of, minlength=group.width)
        if isinstance(t, nn.Parameter):
            params += counts * (t.numel() // t.shape[m.dim])
        if m.tensor in macs and m.role in ("out", "in"):
            flops += counts * (macs[m.tensor] / t.shape[m.dim])
    return params, flops


class MacsModel:
    """Exact MACs of the network once chosen structures are removed (second order: a layer whose
    input and output channels both shrink loses both factors), without touching the model.

    ``keep`` maps group id → boolean keep vector over the group's structures; groups not given
    keep everything.
    """

    def __init__(self, cg: ChannelGraph, macs: dict[str, int] | None = None) -> None:
        self.macs = module_macs(cg.traced) if macs is None else macs
        self.total = float(sum(self.macs.values()))
        # per MAC-carrying tensor: [(group id, structure_of)] for each of its sliced dims
        self._dims: dict[str, list[tuple[int, np.ndarray]]] = {}
        seen: set[tuple[str, int]] = set()
        for g in cg.groups:
            for m in g.members:
                if m.tensor in self.macs and m.role in ("out", "in") and (m.tensor, m.dim) not in seen:
                    seen.add((m.tensor, m.dim))
                    self._dims.setdefault(m.tensor, []).append((g.id, m.structure_of))

    @property
    def sliced_dims(self) -> dict[str, list[tuple[int, np.ndarray]]]:
        """Per MAC-carrying tensor, each of its sliced dims as (group id, structure of every index)."""
        return self._dims

    def after(self, keep: dict[int, np.ndarray]) -> float:
        """MACs per example with the structures ``keep`` marks False removed."""
        gids = tuple(keep)
        index, starts, lengths, tensor_of, macs = self._layout(gids, tuple(len(keep[g]) for g in gids))
        factors = np.ones(len(macs))
        if len(starts):
            kept = np.concatenate([keep[g] for g in gids])[index]
            np.multiply.at(factors, tensor_of, np.add.reduceat(kept, starts, dtype=np.int64) / lengths)
        return float(macs @ factors)

    def _layout(self, gids: tuple[int, ...], widths: tuple[int, ...]) -> tuple[np.ndarray, ...]:
        """For the groups in ``keep`` (in that order): every sliced dim's structures as indices into the
        groups' keep vectors laid end to end, the dims' starts and lengths there, each dim's tensor, and
        the tensors' MACs (zero for a tensor with a dim that has no structures). Made once per set of groups."""
        cache = self.__dict__.setdefault("_layouts", {})
        if (gids, widths) not in cache:
            offset = dict(zip(gids, np.cumsum((0, *widths)), strict=False))
            tensors = list(self.macs)
            macs = np.asarray([float(self.macs[t]) for t in tensors])
            index, lengths, tensor_of = [], [], []
            for t, tensor in enumerate(tensors):
                for gid, structure_of in self._dims.get(tensor, ()):
                    if gid not in offset:
                        continue
                    if not len(structure_of):
                        macs[t] = 0.0
                        continue
                    index.append(np.asarray(structure_of) + offset[gid])
                    lengths.append(len(structure_of))
                    tensor_of.append(t)
            lengths_array = np.asarray(lengths, dtype=np.int64)
            cache[(gids, widths)] = (
                np.concatenate(index) if index else np.zeros(0, dtype=np.int64),
                np.cumsum(lengths_array) - lengths_array, lengths_array, np.asarray(tensor_of, dtype=np.int64), macs)
        return cache[(gids, widths)]

    def reduction(self, keep: dict[int, np.ndarray]) -> float:
        """Dense MACs / MACs after removal (2.0 means half the MACs)."""
        return self.total / max(self.after(keep), 1.0)
