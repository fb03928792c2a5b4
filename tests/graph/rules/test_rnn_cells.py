"""RNN cells (nn.LSTMCell / nn.GRUCell / nn.RNNCell) in loops over time, PackedSequence inputs, and
``aten.lstm`` / ``aten.gru`` from the torch.export front end."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from sparsify import Sparsifier, SparsifyError, build_channel_graph, prune_channels
from sparsify.errors import InexactPruneError, PruneError
from sparsify.extend import register_module_type
from sparsify.graph.channel_graph import ChannelGraph, ChannelGroup
from sparsify.graph.cost import module_macs
from sparsify.testing.oracle import check_exactness, randomize_

TOL = 1e-9
pytestmark = pytest.mark.filterwarnings("ignore:The tensor attributes .*_flat_weights")  # torch.export on nn.LSTM


class CellLM(nn.Module):
    """Embedding → LSTMCell over time (hx=None on the first step) → Linear head on every step.

    ``steps`` fixed: fx traces it (one call_module node per step); ``steps=None`` loops over
    ``ids.shape[1]``, which fx cannot trace, so torch.export gives ``aten.lstm_cell`` nodes."""

    def __init__(self, vocab: int = 20, embed: int = 8, hidden: int = 10, steps: int | None = 5) -> None:
        super().__init__()
        self.steps = steps
        self.emb = nn.Embedding(vocab, embed)
        self.cell = nn.LSTMCell(embed, hidden)
        self.fc = nn.Linear(hidden, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x, state, logits = self.emb(ids), None, []
        for t in range(self.steps or ids.shape[1]):
            state = self.cell(x[:, t], state)
            logits.append(self.fc(state[0]))
        return torch.stack(logits, 1)


class GRULoop(nn.Module):
    """GRUCell from zeros whose width is read from the cell (a module with synced sizes)."""

    def __init__(self, hidden: int = 6) -> None:
        super().__init__()
        self.pre = nn.Linear(5, 7)
        self.cell = nn.GRUCell(7, hidden)
        self.fc = nn.Linear(hidden, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.zeros(x.shape[0], self.cell.hidden_size, dtype=x.dtype)
        x = self.pre(x)
        outs = []
        for t in range(x.shape[1]):
            h = self.cell(x[:, t], h)
            outs.append(h)
        return self.fc(torch.stack(outs, 1))


register_module_type(GRULoop, synced_sizes=True)


class LSTMFromSyncedZeros(nn.Module):
    """nn.LSTM started from zeros sized by the LSTM itself (fx traces this: the root module's code)."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(5, 6)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h0 = torch.zeros(1, x.shape[1], self.rnn.hidden_size, dtype=x.dtype)
        out, _ = self.rnn(x, (h0, h0))
        return self.fc(out)


register_module_type(LSTMFromSyncedZeros, synced_sizes=True)


class StackedCells(nn.Module):
    """Two cells, the second fed by the first: two groups; the second gets its state from a layer."""

    def __init__(self, steps: int = 4) -> None:
        super().__init__()
        self.steps = steps
        self.cell1 = nn.LSTMCell(5, 6)
        self.cell2 = nn.RNNCell(6, 7, nonlinearity="relu")
        self.init2 = nn.Linear(5, 7)
        self.fc = nn.Linear(7, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s1, h2 = None, torch.tanh(self.init2(x[:, 0]))
        for t in range(self.steps):
            s1 = self.cell1(x[:, t], s1)
            h2 = self.cell2(s1[0], h2)
        return self.fc(h2)


class CellNorm(nn.Module):
    """An LSTMCell whose hidden state goes through a LayerNorm to the head: units are inexact."""

    def __init__(self, steps: int = 4) -> None:
        super().__init__()
        self.steps = steps
        self.cell = nn.LSTMCell(5, 6)
        self.norm = nn.LayerNorm(6)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state = None
        for t in range(self.steps):
            state = self.cell(x[:, t], state)
        return self.fc(self.norm(state[0]))


class UnbatchedGRU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.cell = nn.GRUCell(5, 6, bias=False)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = None
        for t in range(3):
            h = self.cell(x[t], h)
        return self.fc(h)


class LearnedCellState(nn.Module):
    """A GRUCell starting from a learned state: the parameter is zeroed and sliced with the units."""

    def __init__(self) -> None:
        super().__init__()
        self.h0 = nn.Parameter(torch.randn(1, 6))
        self.cell = nn.GRUCell(5, 6)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.h0.expand(x.shape[0], -1)
        for t in range(4):
            h = self.cell(x[:, t], h)
        return self.fc(h)


class TracedConstantState(nn.Module):
    """fx bakes torch.zeros(3, 6) (no traced sizes) into the graph as a constant tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.cell = nn.GRUCell(5, 6)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.zeros(3, 6, dtype=torch.float64)
        for t in range(4):
            h = self.cell(x[:, t], h)
        return self.fc(h)


class ConstantZeros(nn.Module):
    """The state starts from zeros whose width 6 is written in forward(): pruning cannot resize it."""

    def __init__(self) -> None:
        super().__init__()
        self.cell = nn.GRUCell(5, 6)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.zeros(x.shape[0], 6, dtype=x.dtype)
        for t in range(x.shape[1]):
            h = self.cell(x[:, t], h)
        return self.fc(h)


class StateFromInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.cell = nn.LSTMCell(5, 6)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor) -> torch.Tensor:
        state = (h0, c0)
        for t in range(3):
            state = self.cell(x[:, t], state)
        return self.fc(state[0])


class PackedLSTM(nn.Module):
    """Padded batch → pack_padded_sequence (unsorted lengths) → 2-layer LSTM → pad_packed_sequence → head,
    plus the last layer's final state h_n."""

    def __init__(self, padding_value: float = 0.0) -> None:
        super().__init__()
        self.padding_value = padding_value
        self.pre = nn.Linear(5, 7)
        self.rnn = nn.LSTM(7, 6, num_layers=2, batch_first=True)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        packed = pack_padded_sequence(self.pre(x), lengths, batch_first=True, enforce_sorted=False)
        out, (h, _) = self.rnn(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, padding_value=self.padding_value,
                                     total_length=x.shape[1])
        return self.fc(out) + h[-1].sum(-1)[:, None, None]


class PackedBiGRU(nn.Module):
    """Time-first, bidirectional, the functions called through their module (nn.utils.rnn....)."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.GRU(5, 6, bidirectional=True)
        self.fc = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(nn.utils.rnn.pack_padded_sequence(x, lengths, enforce_sorted=False))
        return self.fc(nn.utils.rnn.pad_packed_sequence(out)[0])


class ExportedRNNs(nn.Module):
    """nn.LSTM then nn.GRU behind shape-dependent Python control flow: fx fails, torch.export traces it
    (``aten.lstm.input`` / ``aten.gru.input`` nodes). ``state="linear"`` computes the LSTM's h0/c0 with a layer,
    ``state="zeros"`` writes them as zeros of a constant width."""

    def __init__(self, state: str = "", **kw) -> None:
        super().__init__()
        self.state = state
        self.rnn = nn.LSTM(5, 6, batch_first=True, **kw)
        width = (2 if kw.get("bidirectional") else 1) * (kw.get("proj_size") or 6)
        self.init = nn.Linear(5, 6) if state == "linear" else None
        self.gru = nn.GRU(width, 4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] > 100:  # fx cannot trace a branch on a size; export specialises it
            x = x[:, :100]
        if self.state == "linear":
            h0 = self.init(x[:, 0]).unsqueeze(0)
            out, _ = self.rnn(x, (torch.tanh(h0), h0))
        elif self.state == "zeros":
            h0 = torch.zeros(1, x.shape[0], 6, dtype=x.dtype)
            out, _ = self.rnn(x, (h0, h0))
        else:
            out, _ = self.rnn(x)
        out, _ = self.gru(out)
        return self.fc(out)


def _x(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64)


CELL_CASES = {
    "lstm_cell_lm_fx": (lambda: CellLM(steps=5), lambda: torch.randint(0, 20, (3, 5))),
    "lstm_cell_lm_export": (lambda: CellLM(steps=None), lambda: torch.randint(0, 20, (3, 5))),
    "gru_cell_synced_zeros": (GRULoop, lambda: _x(3, 4, 5)),
    "stacked_cells": (StackedCells, lambda: _x(3, 4, 5)),
    "gru_cell_unbatched": (UnbatchedGRU, lambda: _x(3, 5)),
    "gru_cell_learned_state": (LearnedCellState, lambda: _x(3, 4, 5)),
}
OTHER_CASES = {
    "lstm_from_synced_zeros": (LSTMFromSyncedZeros, lambda: _x(4, 3, 5)),
}
EXPORT_CASES = {
    "lstm_2_layers_bidirectional": (lambda: ExportedRNNs(num_layers=2, bidirectional=True), lambda: _x(3, 7, 5)),
    "lstm_proj": (lambda: ExportedRNNs(num_layers=2, proj_size=4), lambda: _x(3, 7, 5)),
    "lstm_state_from_linear": (lambda: ExportedRNNs(state="linear"), lambda: _x(3, 7, 5)),
}
PACKED_CASES = {
    "packed_lstm": (PackedLSTM, lambda: (_x(3, 6, 5), torch.tensor([6, 2, 4]))),
    "packed_bidirectional_gru": (PackedBiGRU, lambda: (_x(6, 4, 5), torch.tensor([3, 6, 1, 5]))),
}


def _build(cases: dict, name: str) -> tuple[nn.Module, object]:
    torch.manual_seed(0)
    build, inputs = cases[name]
    return randomize_(build()).double(), inputs()


def _outputs(model: nn.Module, inputs: object) -> torch.Tensor:
    with torch.no_grad():
        return model(*inputs) if isinstance(inputs, tuple) else model(inputs)


def _unit_groups(cg: ChannelGraph) -> list[ChannelGroup]:
    return [g for g in cg.groups if g.kind == "rnn_unit"]


def _cells(model: nn.Module) -> list[nn.RNNCellBase]:
    return [m for m in model.modules() if isinstance(m, nn.RNNCellBase)]


def _check_cell(m: nn.RNNCellBase) -> None:
    gates = {nn.LSTMCell: 4, nn.GRUCell: 3, nn.RNNCell: 1}[type(m)]
    assert m.weight_ih.shape == (gates * m.hidden_size, m.input_size)
    assert m.weight_hh.shape == (gates * m.hidden_size, m.hidden_size)


@pytest.mark.parametrize("name", sorted(CELL_CASES))
def test_oracle_prunes_cell_units_exactly(name: str) -> None:
    model, inputs = _build(CELL_CASES, name)
    sizes = {id(c): c.hidden_size for c in _cells(model)}
    result = check_exactness(model, inputs)
    units = _unit_groups(result.graph)
    assert len(units) == len(sizes) and all(g.prunable and g.exact for g in units), [
        (g.name, g.why_not()) for g in units]
    assert result.max_abs_diff <= TOL * (1 + result.output_scale)
    for c in _cells(model):
        assert c.hidden_size < sizes[id(c)]
        _check_cell(c)
    _outputs(model, inputs)  # the pruned model runs (synced zeros follow hidden_size)


def test_zeros_with_synced_sizes_start_an_lstm() -> None:
    model, x = _build(OTHER_CASES, "lstm_from_synced_zeros")
    assert any(n.op == "call_module" for n in build_channel_graph(model, x).traced.graph.nodes)  # fx, not export
    result = check_exactness(model, x)
    (g,) = _unit_groups(result.graph)
    assert g.prunable and g.exact and model.rnn.hidden_size == 3
    assert result.max_abs_diff <= TOL * (1 + result.output_scale)


def test_fx_and_export_front_ends_give_the_same_groups() -> None:
    fx_model, ids = _build(CELL_CASES, "lstm_cell_lm_fx")
    ex_model, _ = _build(CELL_CASES, "lstm_cell_lm_export")
    fx_cg, ex_cg = build_channel_graph(fx_model, ids), build_channel_graph(ex_model, ids)
    nodes = [n for n in fx_cg.traced.graph.nodes if n.op == "call_module" and n.target == "cell"]
    aten_nodes = [n for n in ex_cg.traced.graph.nodes if n.target is torch.ops.aten.lstm_cell.default]
    assert len(nodes) == 5 and len(aten_nodes) == 5  # one node per step in both
    for cg in (fx_cg, ex_cg):
        (g,) = _unit_groups(cg)
        members = {(m.tensor, m.dim): m for m in g.members}
        assert g.width == 10 and g.prunable and g.exact
        np.testing.assert_array_equal(members[("cell.weight_ih", 0)].structure_of, np.arange(40) % 10)
        np.testing.assert_array_equal(members[("cell.weight_hh", 1)].structure_of, np.arange(10))
        assert members[("cell.bias_hh", 0)].role == "bias" and members[("fc.weight", 1)].role == "in"


def test_biases_belong_to_the_unit() -> None:
    """Zeroing a unit's weights but not its biases leaves it active: the oracle is not vacuous."""
    from sparsify.testing.oracle import soft_zero_
    model, ids = _build(CELL_CASES, "lstm_cell_lm_fx")
    cg = build_channel_graph(model.eval(), ids)
    (g,) = _unit_groups(cg)
    plan = {g.id: np.array([0, 3])}
    soft_zero_(model, cg.groups, plan, keep_bias=True)
    before = _outputs(model, ids)
    with pytest.raises(InexactPruneError, match="'cell' is called at 5 places"):
        prune_channels(cg, plan)
    prune_channels(cg, plan, allow_inexact=True)
    assert (before - _outputs(model, ids)).abs().max() > 1e-3


def test_layer_norm_after_a_cell_is_inexact() -> None:
    model, x = randomize_(CellNorm()).double(), _x(3, 4, 5)
    cg = build_channel_graph(model, x)
    (g,) = _unit_groups(cg)
    assert g.prunable and not g.exact and "LayerNorm" in g.inexact[0]
    with pytest.raises(InexactPruneError):
        prune_channels(cg, {g.name: [1, 2]})
    prune_channels(build_channel_graph(model, x), {g.name: [1, 2]}, allow_inexact=True)
    assert model.cell.hidden_size == 4 and model.norm.normalized_shape == (4,)
    _check_cell(model.cell)
    _outputs(model, x)


@pytest.mark.parametrize(("model", "inputs", "reason"), [
    (ConstantZeros, lambda: _x(3, 4, 5), "whose sizes [3, 6] are constants"),
    (StateFromInput, lambda: (_x(3, 4, 5), _x(3, 6), _x(3, 6)), "comes from the model input 'h0'"),
    (TracedConstantState, lambda: _x(3, 4, 5), "is the constant tensor '_tensor_constant0'"),
])
def test_fixed_initial_state_blocks_units(model, inputs, reason: str) -> None:
    model, inputs = randomize_(model()).double(), inputs()
    cg = build_channel_graph(model, inputs)
    (g,) = _unit_groups(cg)
    assert not g.prunable and any(reason in r and "Fix: pass hx=None" in r for r in g.blocked), g.blocked
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(PruneError, match="not prunable"):
        prune_channels(cg, {g.id: [0]})
    with pytest.raises(SparsifyError, match="initial state"):
        Sparsifier(model, inputs, adapter="rnn_units", policy="gmp")
    assert model.cell.hidden_size == 6 and all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_macs_count_every_call() -> None:
    model, ids = _build(CELL_CASES, "lstm_cell_lm_export")
    macs = module_macs(build_channel_graph(model, ids).traced)
    assert macs["cell.weight_ih"] == 5 * model.cell.weight_ih.numel()
    assert macs["cell.weight_hh"] == 5 * model.cell.weight_hh.numel()
    fx_model, _ = _build(CELL_CASES, "lstm_cell_lm_fx")
    assert module_macs(build_channel_graph(fx_model, ids).traced) == macs


def test_adapter_vector_is_the_gate_row_norm() -> None:
    model, x = _build(CELL_CASES, "stacked_cells")
    sp = Sparsifier(model, x, adapter="rnn_units", policy="gmp")
    # cell2's state starts from init2: that layer is zeroed with cell2's units
    assert sorted(v.name for v in sp.vectors) == ["cell1", "cell2", "init2 (+2)/initial state"]
    v = next(v for v in sp.vectors if v.name == "cell1")
    w = torch.cat([model.cell1.weight_ih, model.cell1.weight_hh], 1).detach()
    torch.testing.assert_close(v.raw().detach(), w.view(4, 6, -1).pow(2).sum((0, 2)).sqrt())


@pytest.mark.parametrize("policy", ["str", "gmp"])
@pytest.mark.parametrize("steps", [5, None], ids=["fx", "export"])
def test_sparsifier_prunes_cell_units(policy: str, steps: int | None) -> None:
    torch.manual_seed(0)
    model = CellLM(steps=steps).double()
    ids = torch.randint(0, 20, (4, 6))
    if policy == "str":
        with torch.no_grad():  # spread unit norms over 0.1 … 1 × so that STR's threshold catches some
            for p in model.cell.parameters():
                p.view(4, 10, -1).mul_(torch.linspace(0.1, 1.0, 10, dtype=p.dtype).view(1, 10, 1))
        config = {"kind": "str", "s_init": -0.8}
    else:
        config = {"kind": "gmp", "sparsity": 0.5, "end_step": 6, "update_every": 2}
    inputs = ids[:, :5]
    sp = Sparsifier(model, inputs, adapter="rnn_units", policy=config)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(8):
        loss = nn.functional.cross_entropy(model(inputs).flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        sp.step()
    removed = len(next(iter(sp.zero_structures().values())))
    assert 0 < removed < 10
    soft = _outputs(model, inputs)
    sp.prune(optimizer=opt)
    assert model.cell.hidden_size == 10 - removed
    _check_cell(model.cell)
    torch.testing.assert_close(_outputs(model, inputs), soft, rtol=0, atol=1e-10)


def test_sparsifier_zeroes_the_layer_that_makes_a_cell_state() -> None:
    model, x = _build(CELL_CASES, "stacked_cells")
    sp = Sparsifier(model, x, adapter="rnn_units", policy={"kind": "gmp", "sparsity": 0.5})
    sp.policy.finalize()
    soft = _outputs(model, x)
    sp.prune()
    assert (model.cell1.hidden_size, model.cell2.hidden_size, model.init2.out_features) == (3, 4, 4)
    torch.testing.assert_close(_outputs(model, x), soft, rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", sorted(PACKED_CASES))
def test_oracle_prunes_units_behind_packed_sequences(name: str) -> None:
    model, inputs = _build(PACKED_CASES, name)
    cg = build_channel_graph(model, inputs)
    assert any(n.target is pack_padded_sequence for n in cg.traced.graph.nodes)  # fx, packing as one node
    hidden = model.rnn.hidden_size
    result = check_exactness(model, inputs)
    (g,) = _unit_groups(result.graph)
    assert g.prunable and g.exact and g.name in result.report.widths
    assert result.max_abs_diff <= TOL * (1 + result.output_scale)
    assert model.rnn.hidden_size < hidden
    other = (_x(*inputs[0].shape), inputs[1].flip(0))  # other data and lengths: the pruned model still runs
    assert _outputs(model, other).shape[-1] == 3


def test_packed_macs_count_the_valid_steps() -> None:
    model, (x, lengths) = _build(PACKED_CASES, "packed_lstm")
    macs = module_macs(build_channel_graph(model, (x, lengths)).traced)
    assert macs["rnn.weight_ih_l1"] == round(12 / 3) * model.rnn.weight_ih_l1.numel()  # 12 valid steps, 3 sequences


def test_nonzero_padding_makes_units_inexact() -> None:
    torch.manual_seed(0)
    model = PackedLSTM(padding_value=-1.0).double()
    (g,) = _unit_groups(build_channel_graph(model, (_x(3, 6, 5), torch.tensor([6, 2, 4]))))
    assert g.prunable and not g.exact and "pads with -1.0" in g.inexact[0]


@pytest.mark.parametrize("name", sorted(EXPORT_CASES))
def test_oracle_prunes_exported_rnns(name: str) -> None:
    model, x = _build(EXPORT_CASES, name)
    cg = build_channel_graph(model, x)
    targets = {n.target for n in cg.traced.graph.nodes}
    assert torch.ops.aten.lstm.input in targets and torch.ops.aten.gru.input in targets  # the export front end
    sizes = (model.rnn.hidden_size, model.rnn.proj_size, model.gru.hidden_size)
    result = check_exactness(model, x)
    units = _unit_groups(result.graph)
    assert len(units) == 2 and all(g.prunable and g.exact and g.name in result.report.widths for g in units)
    assert result.max_abs_diff <= TOL * (1 + result.output_scale)
    assert model.rnn.hidden_size < sizes[0] and model.gru.hidden_size < sizes[2]
    assert model.rnn.proj_size < sizes[1] or sizes[1] == 0
    directions = 2 if model.rnn.bidirectional else 1
    assert model.gru.input_size == directions * (model.rnn.proj_size or model.rnn.hidden_size)
    model.rnn.flatten_parameters()
    _outputs(model, x)


class _Plain(nn.Module):
    """The same modules without the branch: fx traces it."""

    def __init__(self, other: ExportedRNNs) -> None:
        super().__init__()
        self.rnn, self.gru, self.fc = other.rnn, other.gru, other.fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.gru(self.rnn(x)[0])[0])


def test_exported_lstm_groups_and_macs_match_fx() -> None:
    """The same LSTM traced by fx (module node) and by torch.export (aten.lstm) gives the same unit group and MACs."""
    model, x = _build(EXPORT_CASES, "lstm_proj")
    exported = build_channel_graph(model, x)
    fx_cg = build_channel_graph(_Plain(model), x)
    assert any(n.op == "call_module" and n.target == "rnn" for n in fx_cg.traced.graph.nodes)
    for kind in ("rnn_unit", "rnn_proj"):
        ex = sorted((sorted((m.tensor, m.dim, m.role) for m in g.members)) for g in exported.groups if g.kind == kind)
        fx = sorted((sorted((m.tensor, m.dim, m.role) for m in g.members)) for g in fx_cg.groups if g.kind == kind)
        assert ex == fx and ex
    assert module_macs(exported.traced) == module_macs(fx_cg.traced)


def test_exported_lstm_from_constant_zeros_is_blocked() -> None:
    model, x = randomize_(ExportedRNNs(state="zeros")).double(), _x(3, 7, 5)
    groups = [g for g in _unit_groups(build_channel_graph(model, x)) if "rnn" in g.modules()]
    (g,) = [g for g in groups if any(m.tensor == "rnn.weight_ih_l0" and m.dim == 0 for m in g.members)]
    assert not g.prunable and any("made by zeros() with sizes written as constants" in r for r in g.blocked)


def test_sparsifier_prunes_an_exported_lstm() -> None:
    model, x = _build(EXPORT_CASES, "lstm_state_from_linear")
    sp = Sparsifier(model, x, adapter="rnn_units", policy={"kind": "gmp", "sparsity": 0.5})
    assert {"rnn.l0", "gru.l0"} <= {v.name for v in sp.vectors}
    assert any(v.name.endswith("/initial state") for v in sp.vectors)  # init is zeroed with the LSTM's units
    sp.policy.finalize()
    soft = _outputs(model, x)
    sp.prune()
    assert (model.rnn.hidden_size, model.gru.hidden_size, model.init.out_features) == (3, 2, 3)
    torch.testing.assert_close(_outputs(model, x), soft, rtol=0, atol=1e-10)
