"""RNN cells (nn.LSTMCell, nn.GRUCell, nn.RNNCell) called in a loop over time, and the ops around them.

A cell loop is unrolled by tracing: fx gives one ``call_module`` node per call, ``torch.export``
one ``aten.lstm_cell`` / ``aten.gru_cell`` / ``aten.rnn_tanh_cell`` / ``aten.rnn_relu_cell`` node
per call, its weights as ``get_attr`` inputs. Hidden unit j of a cell owns rows {j, H+j, 2H+j, 3H+j}
(LSTM gates i, f, g, o; GRU r, z, n; RNN one block) of ``weight_ih``, ``weight_hh`` and the biases,
column j of ``weight_hh``, and channel j of h (and c). Every call declares these members, so all
calls of one cell are one group (a tensor dim declared on two spaces couples them), and the state
fed from one call to the next is coupled too.

Exactness is the nn.LSTM argument (``rules/rnn.py``): a unit with zero rows and biases stays 0 if it
starts at 0. A state passed to the first call therefore joins the units: computed inside the
model it is zeroed with them; from a model input, a constant, or ``torch.zeros`` with a width
written as a constant it blocks them (with the reason and the fix). ``hx=None`` starts from zeros of
the right width, and so do zeros whose sizes the code reads from synced attributes: those made
inside the cells' own forward (``hidden_size`` is re-derived after pruning) or in a module type
declared with ``sparsify.extend.register_module_type(cls, synced_sizes=True)`` (e.g. a forward that
calls ``torch.zeros(b, self.cell.hidden_size)``).

Also here: the ATen RNN ops of ``torch.export`` graphs (``aten.lstm.input``, ``aten.gru.input``, …:
the nn.LSTM/GRU/RNN rule applied to the module their flat weight list belongs to), ``torch.stack``
(a loop's per-step outputs), the zero-tensor factories, and packed sequences:
``pack_padded_sequence`` / ``pad_packed_sequence`` are recorded as single fx nodes
(``register_autowrap_function``; fx cannot trace into them), their data's feature dims pass through,
and the nn.LSTM/GRU/RNN rule reads a PackedSequence input's data (``rnn.is_packed``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from sparsify.graph.builder import OpContext, Space
from sparsify.graph.module_types import class_has_synced_sizes, register_module_type, sizes_are_synced
from sparsify.graph.op_rules import register_op_rule
from sparsify.graph.rules.common import couple_elementwise
from sparsify.graph.rules.rnn import _modulo, declare, is_packed
from sparsify.graph.trace import TensorInfo, register_autowrap_function

aten = torch.ops.aten

#: Gate blocks of each cell class and ATen cell op.
CELL_GATES: dict[Any, int] = {nn.LSTMCell: 4, nn.GRUCell: 3, nn.RNNCell: 1,
                              aten.lstm_cell.default: 4, aten.gru_cell.default: 3,
                              aten.rnn_tanh_cell.default: 1, aten.rnn_relu_cell.default: 1}
_PARAMS = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")


def cell_gates(module: nn.Module) -> int:
    """Gate blocks of an nn.LSTMCell / GRUCell / RNNCell (rows of its weights are ``gates × hidden_size``)."""
    return next(g for cls, g in CELL_GATES.items() if isinstance(cls, type) and isinstance(module, cls))


def cell(ctx: OpContext) -> None:
    """nn.LSTMCell / nn.GRUCell / nn.RNNCell (and their ATen ops): hidden unit j of all calls is one structure."""
    node = ctx.node
    if node.op == "call_module":
        m = ctx.module
        gates, lstm = cell_gates(m), isinstance(m, nn.LSTMCell)
        x, hx = ctx.arg(0, "input"), ctx.arg(1, "hx")
        params = {p: (ctx.module_name, p) for p in _PARAMS if getattr(m, p, None) is not None}
    else:
        gates, lstm = CELL_GATES[node.target], node.target is aten.lstm_cell.default
        x, hx = node.args[0], node.args[1]
        nodes = dict(zip(_PARAMS, node.args[2:], strict=False))
        params = {}
        for p, arg in nodes.items():
            name = ctx.param_name(arg)
            if arg is None:
                continue
            if name is None or "." not in name:
                ctx.block_all(f"{ctx.describe()}: its {p} is not a parameter of a cell module (computed?)")
                return
            params[p] = tuple(name.rsplit(".", 1))
    xi = ctx.info(x)
    h = ctx.out(-1, element=0) if lstm else ctx.out(-1)
    if xi is None or h is None or "weight_ih" not in params:
        ctx.block_all(f"{ctx.describe()}: expected a tensor input and a hidden size > 1")
        return
    hidden = ctx.facts.widths[h]
    outputs = [0, 1] if lstm else [None]
    units = h
    if lstm:
        ctx.same(ctx.out(-1, element=1), units)
    ctx.label(units, "rnn_unit")
    if xi.ndim == 2:  # batched: dim 0 is the batch of x, h, c and the states
        for e in outputs:
            ctx.same(ctx.space(x, 0), ctx.out(0, element=e))

    rows = ctx.internal("gates", gates * hidden)
    _modulo(ctx, rows, units, hidden)
    for p, (module, tensor) in params.items():
        ctx.member(rows, module, tensor, 0, "bias" if p.startswith("bias") else "out")
    ctx.member(units, *params["weight_hh"], 1, "in")
    ctx.member(ctx.space(x, -1), *params["weight_ih"], 1, "in")

    if isinstance(hx, (tuple, list)):  # (h, c) as two nodes
        states = [(state, None) for state in hx]
    elif isinstance(ctx.value(hx), (tuple, list)):  # (h, c) as one node: the previous call's output
        states = [(hx, k) for k in range(len(ctx.value(hx)))]
    else:
        states = [(hx, None)]
    for state, element in states:
        _initial_state(ctx, state, element, units, ctx.space(x, 0) if xi.ndim == 2 else None)


def _initial_state(ctx: OpContext, state: Any, element: int | None, units: Space, batch: Space | None) -> None:
    """Couple a state passed to the cell with its units; refuse one whose width pruning cannot change."""
    if not isinstance(state, fx.Node):
        return
    value = ctx.value(state) if element is None else ctx.value(state)[element]
    if not isinstance(value, TensorInfo):
        ctx.block(units, f"{ctx.describe()}: its state '{state.name}' is not a tensor")
        return
    feature = ctx.space(state, -1, element)
    if batch is not None and value.ndim == 2:
        ctx.same(ctx.space(state, 0, element), batch)
    ctx.same(feature, units)
    problem = _fixed_width(ctx, state, feature)
    if problem:
        ctx.block(units, f"{ctx.describe()}: its initial state {problem}. Fix: pass hx=None on the first call "
                         "(the cell then starts from zeros of its current width), make the zeros with a width "
                         "read from the cell (torch.zeros(b, self.cell.hidden_size)) in a module declared with "
                         "sparsify.extend.register_module_type(YourModule, synced_sizes=True), or compute the state "
                         "inside the model (a layer, an nn.Parameter).")


def _fixed_width(ctx: OpContext, node: fx.Node, feature: Space | None) -> str:
    """Why the width of a state made by ``node`` cannot follow pruning, or ''."""
    if node.op == "placeholder":
        return f"comes from the model input '{node.name}', whose size the caller fixes"
    if node.op == "get_attr":
        known = dict(ctx.traced.model.named_parameters()) | dict(ctx.traced.model.named_buffers())
        return "" if str(node.target) in known else f"is the constant tensor '{node.target}' baked in by tracing"
    if ctx.facts.rule_of.get(node.name) == "none":
        return f"'{node.name}' is made by an op without a rule"
    if ctx.facts.rule_of.get(node.name) == "zeros" and feature in ctx.facts.blocked:
        return f"'{node.name}' is made by {ctx.facts.blocked[feature][0]}"
    return ""


def zeros(ctx: OpContext) -> None:
    """torch.zeros / new_zeros / zeros_like: all-zero values, which any slicing keeps exact. Its sizes
    follow pruning only when the code reads them from tensors or synced attributes: zeros made in a
    module type declared with synced sizes (and in the RNN cells' own forward) have free dims;
    others have their dims fixed."""
    out = ctx.out_info
    if out is None:
        return
    if ctx.op_name == "zeros_like":  # sizes read from its input
        couple_elementwise(ctx, ctx.node.args[0])
        return
    for d in range(out.ndim):
        space = ctx.out(d)
        if space is None:
            continue
        if _synced(ctx):
            ctx._define(space)
        else:
            ctx.fresh(space, f"{ctx.describe()}, whose sizes {list(out.shape)} are constants in the graph "
                             "(not read from synced attributes)")


def _synced(ctx: OpContext) -> bool:
    """Whether the module whose forward() made this node is declared with synced sizes; fx records no
    module stack for the root module's own code, so there the root model's class is asked."""
    if ctx.node.meta.get("nn_module_stack"):
        return sizes_are_synced(ctx.node)
    return class_has_synced_sizes(type(ctx.traced.model))


def stack(ctx: OpContext) -> None:
    """torch.stack(tensors, dim): every input dim is the same output dim; the new dim is created."""
    nodes, out = ctx.arg(0, "tensors"), ctx.out_info
    if out is None or not isinstance(nodes, (tuple, list)):
        return
    dim = ctx.value(ctx.arg(1, "dim", 0)) % out.ndim
    ctx.fresh(ctx.out(dim), f"{ctx.describe()} stacks {len(nodes)} tensors in dim {dim}")
    for n in nodes:
        for d in range(out.ndim - 1):
            ctx.same(ctx.space(n, d), ctx.out(d if d < dim else d + 1))


def pack_padded(ctx: OpContext) -> None:
    """pack_padded_sequence(input, lengths, batch_first): the data's rows are the valid steps of all
    sequences, its other dims are the input's feature dims."""
    x, out = ctx.arg(0, "input"), ctx.value(ctx.node)
    xi = ctx.info(x)
    if xi is None or not is_packed(out):
        ctx.block_all(f"{ctx.describe()}: expected a padded tensor input")
        return
    for d in range(2, xi.ndim):
        ctx.same(ctx.space(x, d), ctx.out(d - 1, element=0))
    ctx.fresh(ctx.out(0, element=0), f"{ctx.describe()} packs the valid steps of all sequences into dim 0")
    for k in range(1, len(out)):
        ctx.fresh(ctx.out(0, element=k), f"{ctx.describe()}: an index tensor of the PackedSequence")


def pad_packed(ctx: OpContext) -> None:
    """pad_packed_sequence(sequence, batch_first, padding_value): feature dims pass through; padded steps
    hold ``padding_value`` in every channel, so a removed channel changes them unless it is 0."""
    seq, out = ctx.arg(0, "sequence"), ctx.value(ctx.node)
    if not is_packed(ctx.value(seq)) or not isinstance(out, (tuple, list)) or not isinstance(out[0], TensorInfo):
        ctx.block_all(f"{ctx.describe()}: expected a PackedSequence")
        return
    data, padding = ctx.value(seq)[0], ctx.value(ctx.arg(2, "padding_value", 0.0))
    for d in range(1, data.ndim):
        ctx.same(ctx.space(seq, d, element=0), ctx.out(d + 1, element=0))
        if padding != 0:
            ctx.mark_inexact(ctx.out(d + 1, element=0), f"{ctx.describe()} pads with {padding}, which a removed "
                                                        "channel no longer contributes")
    for d in (0, 1):
        ctx.fresh(ctx.out(d, element=0), f"{ctx.describe()} creates the time and batch dims")
    ctx.fresh(ctx.out(0, element=1), f"{ctx.describe()}: sequence lengths")


def rnn_aten(ctx: OpContext) -> None:
    """``aten.lstm.input`` / ``aten.gru.input`` / ``aten.rnn_{tanh,relu}.input`` (torch.export's nn.LSTM/GRU/RNN):
    the flat weight list names the module; the couplings are the module rule's (``rnn.declare``)."""
    node = ctx.node
    x, hx, weights = node.args[0], node.args[1], node.args[2]
    names = [ctx.param_name(w) for w in weights] if isinstance(weights, (tuple, list)) else [None]
    module_name = (names[0] or "").rpartition(".")[0]
    try:
        m = ctx.traced.model.get_submodule(module_name) if names[0] else None
    except AttributeError:
        m = None
    flat = [f"{module_name}.{n}" if module_name else n for n in getattr(m, "_flat_weights_names", ())]
    if not isinstance(m, nn.RNNBase) or names != flat:
        ctx.block_all(f"{ctx.describe()}: its weights are not the parameters of one nn.RNN/LSTM/GRU module")
        return
    lstm = node.target is aten.lstm.input
    declare(ctx, m, module_name, x, hx, 1, 2 if lstm else None)


def _sync_cell(m: nn.RNNCellBase, old: dict[str, Any]) -> None:
    m.hidden_size = m.weight_hh.shape[1]
    m.input_size = m.weight_ih.shape[1]


# the cells: their forward makes zero states of self.hidden_size, which the attribute sync keeps up to date
for _cls in (nn.LSTMCell, nn.GRUCell, nn.RNNCell):
    register_module_type(_cls, rule=cell, synced_sizes=True)
register_module_type(nn.RNNCellBase, sync=_sync_cell)
register_op_rule("rnn_cell_aten", cell, functions=tuple(k for k in CELL_GATES if not isinstance(k, type)))
register_op_rule("rnn_aten", rnn_aten, functions=(aten.lstm.input, aten.gru.input, aten.rnn_tanh.input,
                                                  aten.rnn_relu.input))
register_op_rule("zeros", zeros, functions=(torch.zeros, torch.zeros_like, aten.zeros.default, aten.new_zeros.default,
                                            aten.zeros_like.default), methods=("new_zeros",))
register_op_rule("stack", stack, functions=(torch.stack, aten.stack.default))
# fx cannot trace into packing (data-dependent sizes): record these calls as single nodes
register_autowrap_function(pack_padded_sequence)
register_autowrap_function(pad_packed_sequence)
register_op_rule("pack_padded_sequence", pack_padded, functions=(pack_padded_sequence,))
register_op_rule("pad_packed_sequence", pad_packed, functions=(pad_packed_sequence,))
