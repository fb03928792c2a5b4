"""Parameter and multiply-accumulate (MAC) counts, per module and per channel structure."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from sparsify._utils import get_tensor
from sparsify.graph.channel_graph import ChannelGraph, ChannelGroup
from sparsify.graph.trace import TensorInfo, TracedModel

_aten = torch.ops.aten
_CELL_OPS = (_aten.lstm_cell.default, _aten.gru_cell.default, _aten.rnn_tanh_cell.default, _aten.rnn_relu_cell.default)
_RNN_OPS = (_aten.lstm.input, _aten.gru.input, _aten.rnn_tanh.input, _aten.rnn_relu.input)
_SDPA_KERNELS = ("scaled_dot_product_attention", "_scaled_dot_product_attention_math",
                 "_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_for_cpu",
                 "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention")
_SDPA_OPS = (F.scaled_dot_product_attention, *(getattr(packet, n) for name in _SDPA_KERNELS
                                               if (packet := getattr(_aten, name, None)) is not None
                                               for n in packet.overloads()))

#: Suffix of a ``module_macs`` key that counts an attention product (activation × activation) scaling with
#: the kept output rows (dim 0) of the weight before it: ``"layers.0.q_proj.weight@out"``.
OUT_ROWS = "@out"


def product_weight(key: str) -> str | None:
    """For a ``module_macs`` key of an attention product, the weight whose kept output rows (dim 0) scale it;
    None for any other key (a weight's own MACs, or a product whose projection was not found: fixed)."""
    return key[: -len(OUT_ROWS)] if key.endswith(OUT_ROWS) else None


def is_weight_key(key: str) -> bool:
    """Whether a ``module_macs`` key names the weight it multiplies (not an attention product)."""
    return "@" not in key


def module_macs(traced: TracedModel) -> dict[str, int]:
    """MACs per example (batch dim 0 divided out) of every conv/linear/RNN(-cell) call in the trace, keyed by
    the qualified name of the weight it multiplies, and of the two products of every scaled dot-product
    attention (Q·Kᵀ and A·V, see :func:`_sdpa_macs`), keyed ``f"{projection weight}@out"`` (scaling with the
    kept output rows of the q or v projection) or, where no projection is found, ``f"{node}@qk"`` /
    ``f"{node}@av"`` (fixed). Keys with ``@`` are not parameters: see :func:`is_weight_key`."""
    macs: dict[str, int] = {}
    gm = traced.graph_module
    for node in gm.graph.nodes:
        out = traced.values.get(node.name)
        if _sdpa_macs(macs, traced, node):
            continue
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


def _sdpa_macs(macs: dict[str, int], traced: TracedModel, node: fx.Node) -> bool:
    """``scaled_dot_product_attention(q, k, v)`` (or one of its ATen kernels): Q·Kᵀ costs ``Lk`` MACs per
    element of q, A·V ``Lk`` per element of the output (per example: dim 0 divided out, as for a Linear).
    Q·Kᵀ is keyed by q's projection, A·V by v's (:func:`_projection`), so that pruning heads or head_dim
    slots (which shrink those projections' output rows in proportion) scales them. True if an SDPA call."""
    if node.op != "call_function" or node.target not in _SDPA_OPS:
        return False
    args = [node.args[i] if len(node.args) > i else node.kwargs.get(name)
            for i, name in enumerate(("query", "key", "value"))]
    out = traced.values.get(node.name)
    out = out[0] if isinstance(out, (tuple, list)) and out else out  # the flash/efficient kernels: (out, lse, …)
    q, k = (traced.values.get(a.name) if isinstance(a, fx.Node) else None for a in args[:2])
    if not all(isinstance(t, TensorInfo) and t.ndim >= 2 for t in (q, k, out)):
        return True
    keys = k.shape[-2]
    for arg, per_example, tag in ((args[0], math.prod(q.shape[1:]) * keys, "qk"),
                                  (args[2], math.prod(out.shape[1:]) * keys, "av")):
        weight = _projection(traced, arg, {}) if isinstance(arg, fx.Node) else None
        key = f"{weight}{OUT_ROWS}" if weight else f"{node.name}@{tag}"
        macs[key] = macs.get(key, 0) + per_example
    return True


# ops whose output holds each element of their one tensor input a fixed number of times (layout, casts,
# negation, repetition of whole dims): the element count stays proportional to the input's
_PASS = frozenset({"view", "_unsafe_view", "reshape", "transpose", "permute", "contiguous", "clone", "flatten",
                   "unflatten", "unsqueeze", "squeeze", "expand", "to", "type", "float", "double", "half",
                   "bfloat16", "neg", "detach", "alias", "dropout", "_to_copy", "lift_fresh_copy"})
_ELEMENTWISE = frozenset({"add", "sub", "mul", "div", "truediv", "iadd", "imul"})
_SELECT = frozenset({"getitem", "slice", "narrow", "select"})  # followed only if no element is dropped


def _name(node: fx.Node) -> str:
    if node.op == "call_method":
        return str(node.target)
    return getattr(node.target, "__name__", "").split(".")[0] if node.op == "call_function" else ""


def _projection(traced: TracedModel, node: fx.Node, memo: dict[str, str | None], depth: int = 0) -> str | None:
    """The weight of the Linear (module, ``F.linear`` or ``aten.linear`` on a parameter) whose output
    ``node`` is, up to ops that keep the element count proportional to that output's: layout ops, casts,
    repetition (``expand``, GQA's ``repeat_kv``), selections that drop nothing, element-wise add/sub/mul/div
    with operands of the output's shape all coming from the same projection (a broadcast operand, such as
    rotary cos/sin, is a factor), and a ``cat`` of slices of one tensor that puts all its elements back
    (``rotate_half``). None where unsure (any other op, two different projections)."""
    if node.name not in memo:
        memo[node.name] = None  # a node met again on its own path (cannot happen in a DAG): unsure
        memo[node.name] = _walk(traced, node, memo, depth)
    return memo[node.name]


def _walk(traced: TracedModel, node: fx.Node, memo: dict[str, str | None], depth: int) -> str | None:
    info = traced.values.get(node.name)
    if depth > 64 or not isinstance(info, TensorInfo):
        return None
    name = _name(node)
    if node.op == "call_module":
        m = traced.graph_module.get_submodule(str(node.target))
        if isinstance(m, nn.Linear):
            return f"{node.target}.weight"
        if isinstance(m, (nn.Dropout, nn.Identity)) and node.args and isinstance(node.args[0], fx.Node):
            return _projection(traced, node.args[0], memo, depth + 1)
        return None
    if node.op not in ("call_function", "call_method") or not node.args:
        return None
    if name == "cat" and isinstance(node.args[0], (list, tuple)):
        root = _cat_root(traced, node.args[0], info)
        return _projection(traced, root, memo, depth + 1) if root is not None else None
    if not isinstance(node.args[0], fx.Node):
        return None
    first = node.args[0]
    if name == "linear":
        weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
        return str(weight.target) if isinstance(weight, fx.Node) and weight.op == "get_attr" else None
    if name in _PASS:
        return _projection(traced, first, memo, depth + 1)
    if name in _SELECT:
        src = traced.values.get(first.name)
        if isinstance(src, TensorInfo) and math.prod(src.shape) == math.prod(info.shape):
            return _projection(traced, first, memo, depth + 1)
        return None
    if name in _ELEMENTWISE:
        carriers = [a for a in node.args if isinstance(a, fx.Node)
                    and isinstance(t := traced.values.get(a.name), TensorInfo) and t.shape == info.shape]
        found = {_projection(traced, a, memo, depth + 1) for a in carriers}
        return found.pop() if len(found) == 1 else None  # {None}, {} or two projections: unsure
    return None


def _cat_root(traced: TracedModel, parts: Sequence[Any], info: TensorInfo) -> fx.Node | None:
    """The one tensor that every part of a cat slices (through negation), if the cat has its shape."""
    roots = set()
    for part in parts:
        while isinstance(part, fx.Node) and _name(part) in ("neg", "getitem", "slice", "narrow"):
            part = part.args[0]
        roots.add(part)
    root = roots.pop() if len(roots) == 1 else None
    src = traced.values.get(root.name) if isinstance(root, fx.Node) else None
    return root if isinstance(src, TensorInfo) and src.shape == info.shape else None


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def structure_costs(cg: ChannelGraph, group: ChannelGroup, macs: dict[str, int] | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(params, MACs) that removing each structure of ``group`` saves, to first order.

    Each member contributes its tensor's size per index; each conv/linear member contributes its
    MACs per index of the sliced dim, and a weight's output rows (dim 0) the attention products keyed
    by it (``f"{weight}@out"``) per row. Savings shared with a neighbouring group that is pruned too
    are counted by both (the usual first-order estimate).
    """
    macs = module_macs(cg.traced) if macs is None else macs
    params = np.zeros(group.width)
    flops = np.zeros(group.width)
    model = cg.model
    for m in group.members:
        t = get_tensor(model, m.tensor)
        counts = np.bincount(m.structure_of, minlength=group.width)
        if isinstance(t, nn.Parameter):
            params += counts * (t.numel() // t.shape[m.dim])
        if m.tensor in macs and m.role in ("out", "in"):
            flops += counts * (macs[m.tensor] / t.shape[m.dim])
        if m.dim == 0 and m.role == "out" and (key := m.tensor + OUT_ROWS) in macs:
            flops += counts * (macs[key] / t.shape[0])
    return params, flops


class MacsModel:
    """Exact MACs of the network once chosen structures are removed (second order: a layer whose
    input and output channels both shrink loses both factors), without touching the model.

    ``keep`` maps group id → boolean keep vector over the group's structures; groups not given
    keep everything. An attention product keyed ``f"{weight}@out"`` scales with the kept output rows
    (dim 0) of that weight only; one keyed by its SDPA node is fixed.
    """

    def __init__(self, cg: ChannelGraph, macs: dict[str, int] | None = None) -> None:
        self.macs = module_macs(cg.traced) if macs is None else macs
        self.total = float(sum(self.macs.values()))
        # per MAC-carrying tensor: [(group id, structure_of)] for each of its sliced dims
        self._dims: dict[str, list[tuple[int, np.ndarray]]] = {}
        seen: set[tuple[str, int] | str] = set()
        for g in cg.groups:
            for m in g.members:
                if m.tensor in self.macs and m.role in ("out", "in") and (m.tensor, m.dim) not in seen:
                    seen.add((m.tensor, m.dim))
                    self._dims.setdefault(m.tensor, []).append((g.id, m.structure_of))
                if m.dim == 0 and m.role == "out" and (key := m.tensor + OUT_ROWS) in self.macs and key not in seen:
                    seen.add(key)  # the attention products scaling with this weight's output rows
                    self._dims[key] = [(g.id, m.structure_of)]

    @property
    def sliced_dims(self) -> dict[str, list[tuple[int, np.ndarray]]]:
        """Per MAC-carrying tensor (or ``f"{weight}@out"`` attention product), each of its sliced dims as
        (group id, structure of every index)."""
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
