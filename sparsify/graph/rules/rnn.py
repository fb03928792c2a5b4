"""Recurrent layers (nn.RNN, nn.LSTM, nn.GRU): hidden units, and LSTM projections, as channels.

An ``nn.LSTM`` has one ``hidden_size`` H (and ``proj_size`` P) for all its layers and both
directions, so unit j of every layer and direction is one structure. It owns rows {j, H+j, 2H+j,
3H+j} (gates i, f, g, o; GRU: r, z, n; RNN: one block) of every ``weight_ih_l{k}[_reverse]``,
``weight_hh_l{k}[_reverse]`` and bias; column j of every ``weight_hh`` (the recurrence); columns j
and H+j (bidirectional) of the next layer's ``weight_ih``; channels j and H+j of the output; index j
of h_n, c_n and of initial states. The gate rows live in an internal space of width gates·H that is
coupled to the units by ``j ↦ j mod H``.

Exactness: with all of unit j's rows and biases zero, an LSTM's gates are i = f = o = σ(0) and
g = tanh(0) = 0, so c_j stays 0 and h_j = o·tanh(c_j) = 0; a GRU's candidate n = tanh(0) = 0 gives
h_j(t) = z·h_j(t−1) = 0; a plain RNN gives tanh(0) = relu(0) = 0 — provided unit j *starts* at 0.
An initial state passed to the module is therefore coupled with the units: computed inside the
model (by a layer, from an ``nn.Parameter``, another RNN's final state) it is zeroed with them; a
model input, or a tensor made by an op without a rule or by ``torch.zeros(n, b, 64)`` with constant
sizes, blocks them (zeros made in a module declared with ``register_module_type(cls, synced_sizes=True)``
follow pruning: ``rules/rnn_cells.py``).

With ``proj_size`` P the hidden units are internal (``weight_hr_l{k}`` columns consume them, c_n
indexes them) and the P projected channels form a second group: rows of ``weight_hr_l{k}``,
columns of ``weight_hh`` and of the next layer's ``weight_ih``, the output and h_n.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch.fx as fx
from torch import nn

from sparsify.graph.builder import OpContext, Space
from sparsify.graph.module_types import register_module_type
from sparsify.graph.trace import TensorInfo

#: Gate blocks per ``RNNBase.mode``: rows of weight_ih/weight_hh are ``gates × hidden_size``.
GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}


def layer_names(module: nn.RNNBase) -> list[str]:
    """The suffixes ``l{k}`` / ``l{k}_reverse`` of the module's layers and directions, in order."""
    directions = ("", "_reverse") if module.bidirectional else ("",)
    return [f"l{k}{d}" for k in range(module.num_layers) for d in directions]


def _modulo(ctx: OpContext, wide: Space | None, narrow: Space | None, period: int) -> None:
    """Channel i of ``wide`` is channel i mod ``period`` of ``narrow``."""
    if wide is None or narrow is None:
        return
    width = ctx.facts.widths[wide]
    if width == period:
        ctx.same(wide, narrow)
    else:
        ctx.pairs(wide, narrow, np.arange(width), np.arange(width) % period)


def rnn(ctx: OpContext) -> None:
    """nn.RNN / nn.LSTM / nn.GRU: hidden unit j of all layers and directions is one structure."""
    lstm = isinstance(ctx.module, nn.LSTM)
    declare(ctx, ctx.module, ctx.module_name, ctx.arg(0, "input"), ctx.arg(1, "hx"), (1, 0) if lstm else 1,
            (1, 1) if lstm else None)


def declare(ctx: OpContext, m: nn.RNNBase, module_name: str, x: Any, hx: Any, h_n: Any, c_n: Any) -> None:
    """The couplings of one call of ``m`` (module ``module_name``): ``h_n`` / ``c_n`` are the output elements
    of the final states ((1, 0) and (1, 1) for nn.LSTM's (output, (h_n, c_n)); 1 and 2 for ``aten.lstm``)."""
    value, what = ctx.value(ctx.node), ctx.describe()
    packed = is_packed(ctx.value(x))  # a PackedSequence (data, batch_sizes, ...): element 0 is its data
    xe, oe = (0, (0, 0)) if packed else (None, 0)  # where the features are in the input and the output
    xi = ctx.value(x)[0] if packed else ctx.info(x)
    if xi is None or not isinstance(value, (tuple, list)) or m.mode not in GATES:
        ctx.block_all(f"{what}: only a tensor input or a PackedSequence (from pack_padded_sequence) is supported")
        return
    lstm = m.mode == "LSTM"
    gates, hidden, proj = GATES[m.mode], m.hidden_size, m.proj_size
    h_out = proj or hidden
    batched = xi.ndim == 3
    states = [h_n, c_n] if lstm else [h_n]

    # time and batch dims pass through (packed: the rows of all steps); dim 0 of h_n / c_n stacks layers × directions
    t_dim, b_dim = ((1, 0) if m.batch_first else (0, 1)) if batched else (0, None)
    ctx.same(ctx.space(x, t_dim, xe), ctx.out(t_dim, element=oe))
    stacked = f"{what} stacks layers × directions in dim 0 of its states"
    for st in states:
        ctx.fresh(ctx.out(0, element=st), stacked)
        if packed:
            ctx.fresh(ctx.out(1, element=st), f"{what}: batch dim of a state of a packed sequence")
    if packed:
        for k in range(1, len(value[0])):  # batch_sizes, sorted and unsorted indices
            ctx.fresh(ctx.out(0, element=(0, k)), f"{what}: index tensor of its PackedSequence output")
    if b_dim is not None:
        ctx.same(ctx.space(x, b_dim), ctx.out(b_dim, element=0))
        for st in states:
            ctx.same(ctx.space(x, b_dim), ctx.out(1, element=st))

    # feature spaces: units U (width H), recurrent channels R (h_n: H, or P with projections)
    out = ctx.out(-1, element=oe)
    rec = ctx.out(-1, element=h_n)
    units = ctx.out(-1, element=c_n) if lstm else rec
    if units is None or rec is None:
        ctx.block_all(f"{what} has hidden_size {hidden} and proj_size {proj}: nothing to prune")
        return
    if not proj:
        ctx.same(units, rec)
    _modulo(ctx, out, rec, h_out)
    ctx.label(units, "rnn_unit")
    if proj:
        ctx.label(rec, "rnn_proj")

    def member(space: Space | None, tensor: str, dim: int, role: str) -> None:
        if getattr(m, tensor, None) is not None:
            ctx.member(space, module_name, tensor, dim, role)

    x_features = ctx.space(x, -1, xe)
    for layer in layer_names(m):
        rows = ctx.internal(f"gates_{layer}", gates * hidden)
        _modulo(ctx, rows, units, hidden)
        for tensor, role in (("weight_ih", "out"), ("weight_hh", "out"), ("bias_ih", "bias"), ("bias_hh", "bias")):
            member(rows, f"{tensor}_{layer}", 0, role)
        member(rec, f"weight_hh_{layer}", 1, "in")
        member(x_features if layer.startswith("l0") else out, f"weight_ih_{layer}", 1, "in")
        if proj:
            member(rec, f"weight_hr_{layer}", 0, "out")
            member(units, f"weight_hr_{layer}", 1, "in")

    if hx is not None:
        _initial_states(ctx, hx, [rec, units] if lstm else [rec], ctx.space(x, b_dim) if batched else None)


def is_packed(value: object) -> bool:
    """Whether a traced value is a PackedSequence (recorded as a tuple whose element 0 is 2-D data)."""
    return isinstance(value, (tuple, list)) and len(value) == 4 and isinstance(value[0], TensorInfo) and (
        value[0].ndim == 2) and isinstance(value[1], TensorInfo) and value[1].ndim == 1


def _initial_states(ctx: OpContext, hx, targets: list[Space], batch: Space | None) -> None:
    """Couple h0 (and c0) with the channels they initialise; refuse states from outside the model."""
    what = ctx.describe()
    for i, target in enumerate(targets):
        if isinstance(hx, (tuple, list)):
            node, element = hx[i], None
        else:  # one node: a tensor (GRU/RNN) or a tuple (an LSTM's state from another LSTM)
            node, element = hx, (i if len(targets) > 1 else None)
        if not isinstance(node, fx.Node):
            continue
        ctx.block(ctx.space(node, 0, element), f"{what} stacks layers × directions in dim 0 of its states")
        if batch is not None:
            ctx.same(ctx.space(node, 1, element), batch)
        ctx.same(ctx.space(node, -1, element), target)
        fix = ("Fix: call the RNN without an initial state (it then starts from zeros), or compute the "
               "state inside the model (from a layer, an nn.Parameter or another RNN's final state).")
        if node.op == "placeholder":
            ctx.block(target, f"{what}: its initial state comes from the model input '{node.name}', whose "
                              f"size the caller fixes; pruning would need a smaller one. {fix}")
        elif ctx.facts.rule_of.get(node.name) == "none":
            ctx.block(target, f"{what}: its initial state '{node.name}' is made by an op without a rule "
                              f"(torch.zeros with sizes fixed in forward()?), which pruning cannot resize. {fix}")
        elif ctx.facts.rule_of.get(node.name) == "zeros" and ctx.space(node, -1, element) in ctx.facts.blocked:
            ctx.block(target, f"{what}: its initial state '{node.name}' is made by zeros() with sizes written as "
                              f"constants, which pruning cannot resize. {fix} Or make the zeros with sizes read "
                              "from the RNN (self.rnn.hidden_size) in a module declared with "
                              "sparsify.extend.register_module_type(YourModule, synced_sizes=True).")


# their forward makes zero states of self.hidden_size (proj_size), which the attribute sync
# (sparsify.prune.attributes) keeps up to date
for _cls in (nn.RNN, nn.LSTM, nn.GRU):
    register_module_type(_cls, rule=rnn, synced_sizes=True)
