"""RNN hidden units (nn.LSTM / nn.GRU / nn.RNN) as channel groups, and the ``rnn_units`` adapter."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import sparsify
from sparsify import Sparsifier, SparsifyError, build_channel_graph, prune_channels
from sparsify.errors import InexactPruneError, PruneError
from sparsify.graph.channel_graph import ChannelGraph, ChannelGroup
from sparsify.policies.base import set_group_masks
from sparsify.testing.oracle import check_exactness, randomize_, soft_zero_

TOL = 1e-9
GATES = {nn.LSTM: 4, nn.GRU: 3, nn.RNN: 1}


class Seq(nn.Module):
    """x (T, N, F) or (N, T, F) → RNN → head(output); ``head`` is "linear" or "layernorm"."""

    def __init__(self, cls=nn.LSTM, features: int = 5, hidden: int = 6, head: str = "linear", **kw) -> None:
        super().__init__()
        self.pre = nn.Linear(features, 7)
        self.rnn = cls(7, hidden, **kw)
        width = (2 if kw.get("bidirectional") else 1) * (kw.get("proj_size") or hidden)
        self.norm = nn.LayerNorm(width) if head == "layernorm" else nn.Identity()
        self.fc = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.pre(x))
        return self.fc(self.norm(out))


class LanguageModel(nn.Module):
    def __init__(self, vocab: int = 20, embed: int = 8, hidden: int = 10, **kw) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, embed)
        self.rnn = nn.LSTM(embed, hidden, batch_first=True, **kw)
        self.fc = nn.Linear(hidden, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.emb(ids))
        return self.fc(out)


class LastState(nn.Module):
    """A classifier on the final states h_n of both directions (nested tuple (h_n, c_n))."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(5, 6, num_layers=2, batch_first=True, bidirectional=True)
        self.fc = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, (h, c) = self.rnn(x)
        return self.fc(torch.cat([h[-2], h[-1]], dim=1)) + c.sum() + out.sum()


class StateFromLinear(nn.Module):
    """h0 and c0 computed inside the model: zeroed with the units, so pruning stays exact."""

    def __init__(self) -> None:
        super().__init__()
        self.init_h, self.init_c = nn.Linear(4, 6), nn.Linear(4, 6)
        self.rnn = nn.LSTM(5, 6)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        h0, c0 = torch.tanh(self.init_h(z)).unsqueeze(0), self.init_c(z).unsqueeze(0)
        out, _ = self.rnn(x, (h0, c0))
        return self.fc(out)


class LearnedState(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.h0 = nn.Parameter(torch.randn(2, 1, 6))
        self.rnn = nn.GRU(5, 6, num_layers=2)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x, self.h0.expand(-1, x.shape[1], -1).contiguous())
        return self.fc(out)


class EncoderDecoder(nn.Module):
    """The decoder starts from the encoder's final state: both RNNs' units are one group."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.GRU(5, 6, num_layers=2)
        self.dec = nn.GRU(5, 6, num_layers=2)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        _, state = self.enc(x)
        out, _ = self.dec(y, state)
        return self.fc(out)


class StateFromInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.GRU(5, 6)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x, h0)
        return self.fc(out)


class ZerosState(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(5, 6)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h0 = torch.zeros(1, x.shape[1], 6, dtype=x.dtype)  # 6 is a constant: pruning cannot change it
        out, _ = self.rnn(x, (h0, h0))
        return self.fc(out)


def _x(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64)


TxN = (7, 3, 5)
CASES = {
    "lstm_2_layers": (lambda: Seq(nn.LSTM, num_layers=2), lambda: _x(*TxN)),
    "lstm_bidirectional_batch_first": (lambda: Seq(nn.LSTM, num_layers=2, bidirectional=True, batch_first=True),
                                       lambda: _x(3, 7, 5)),
    "lstm_proj": (lambda: Seq(nn.LSTM, hidden=8, num_layers=2, proj_size=5, bidirectional=True), lambda: _x(*TxN)),
    "lstm_no_bias": (lambda: Seq(nn.LSTM, num_layers=2, bias=False), lambda: _x(*TxN)),
    "lstm_unbatched": (lambda: Seq(nn.LSTM, num_layers=2, bidirectional=True), lambda: _x(7, 5)),
    "gru_3_layers_bidirectional": (lambda: Seq(nn.GRU, num_layers=3, bidirectional=True), lambda: _x(*TxN)),
    "gru_no_bias": (lambda: Seq(nn.GRU, bias=False), lambda: _x(*TxN)),
    "rnn_relu": (lambda: Seq(nn.RNN, num_layers=2, nonlinearity="relu"), lambda: _x(*TxN)),
    "language_model": (lambda: LanguageModel(num_layers=2), lambda: torch.randint(0, 20, (3, 9))),
    "last_state": (LastState, lambda: _x(3, 7, 5)),
    "state_from_linear": (StateFromLinear, lambda: (_x(*TxN), _x(3, 4))),
    "learned_state": (LearnedState, lambda: _x(*TxN)),
    "encoder_decoder": (EncoderDecoder, lambda: (_x(*TxN), _x(4, 3, 5))),
}


def _build(name: str) -> tuple[nn.Module, object]:
    torch.manual_seed(0)
    build, inputs = CASES[name]
    return randomize_(build()).double(), inputs()


def _outputs(model: nn.Module, inputs: object) -> torch.Tensor:
    with torch.no_grad():
        return model(*inputs) if isinstance(inputs, tuple) else model(inputs)


def _rnns(model: nn.Module) -> list[nn.RNNBase]:
    return [m for m in model.modules() if isinstance(m, nn.RNNBase)]


def _check_attributes(rnn: nn.RNNBase) -> None:
    """hidden_size / proj_size / input_size agree with every weight, and forward uses the new ones."""
    gates = GATES[type(rnn)]
    out = rnn.proj_size or rnn.hidden_size
    directions = 2 if rnn.bidirectional else 1
    for k in range(rnn.num_layers):
        for sfx in ("", "_reverse")[:directions]:
            assert getattr(rnn, f"weight_ih_l{k}{sfx}").shape == (
                gates * rnn.hidden_size, rnn.input_size if k == 0 else directions * out)
            assert getattr(rnn, f"weight_hh_l{k}{sfx}").shape == (gates * rnn.hidden_size, out)
            if rnn.bias:
                assert getattr(rnn, f"bias_ih_l{k}{sfx}").shape == (gates * rnn.hidden_size,)
            if rnn.proj_size:
                assert getattr(rnn, f"weight_hr_l{k}{sfx}").shape == (rnn.proj_size, rnn.hidden_size)
    assert all(a is b for a, b in zip(rnn._flat_weights, [getattr(rnn, n) for n in rnn._flat_weights_names],
                                      strict=True))


def _unit_groups(cg: ChannelGraph) -> list[ChannelGroup]:
    return [g for g in cg.groups if g.kind == "rnn_unit"]


@pytest.mark.parametrize("name", sorted(CASES))
def test_oracle_prunes_hidden_units_exactly(name: str) -> None:
    model, inputs = _build(name)
    widths = {id(r): (r.hidden_size, r.proj_size) for r in _rnns(model)}
    result = check_exactness(model, inputs)
    units = _unit_groups(result.graph)
    assert units and all(g.prunable and g.exact for g in units), [(g.name, g.why_not()) for g in units]
    for g in units:
        assert g.name in result.report.widths, f"the oracle did not prune {g.name}"
    assert result.max_abs_diff <= TOL * (1 + result.output_scale)
    for rnn in _rnns(model):
        hidden, proj = widths[id(rnn)]
        assert rnn.hidden_size < hidden and (rnn.proj_size < proj or proj == 0)
        _check_attributes(rnn)
        rnn.flatten_parameters()
    _outputs(model, inputs)


def test_gate_rows_are_coupled_per_unit() -> None:
    """Unit j owns rows j, H+j, 2H+j, 3H+j of each layer's weights and column j of weight_hh."""
    model, inputs = _build("lstm_bidirectional_batch_first")
    (g,) = _unit_groups(build_channel_graph(model, inputs))
    assert g.width == 6
    members = {(m.tensor, m.dim): m for m in g.members}
    np.testing.assert_array_equal(members[("rnn.weight_ih_l1_reverse", 0)].structure_of, np.arange(24) % 6)
    np.testing.assert_array_equal(members[("rnn.weight_hh_l0", 1)].structure_of, np.arange(6))
    np.testing.assert_array_equal(members[("rnn.weight_ih_l1", 1)].structure_of, np.arange(12) % 6)
    np.testing.assert_array_equal(members[("fc.weight", 1)].structure_of, np.arange(12) % 6)
    assert members[("rnn.bias_hh_l1", 0)].role == "bias"


def test_projections_are_a_second_group() -> None:
    model, inputs = _build("lstm_proj")
    cg = build_channel_graph(model, inputs)
    (proj,) = [g for g in cg.groups if g.kind == "rnn_proj"]
    assert proj.width == 5 and proj.prunable and proj.exact
    members = {(m.tensor, m.dim): m.role for m in proj.members}
    assert members[("rnn.weight_hr_l1_reverse", 0)] == "out"
    assert members[("rnn.weight_hh_l0", 1)] == "in" and members[("fc.weight", 1)] == "in"
    (units,) = _unit_groups(cg)
    assert {(m.tensor, m.dim): m.role for m in units.members}[("rnn.weight_hr_l0", 1)] == "in"


def test_biases_belong_to_the_unit() -> None:
    """Zeroing a unit's weights but not its biases leaves it active (c and h drift over time):
    removing it then changes the output, so the oracle above is not vacuous."""
    model, inputs = _build("lstm_2_layers")
    cg = build_channel_graph(model.eval(), inputs)
    (g,) = _unit_groups(cg)
    plan = {g.id: np.array([0, 3])}
    soft_zero_(model, cg.groups, plan, keep_bias=True)
    before = _outputs(model, inputs)
    prune_channels(cg, plan)
    assert (before - _outputs(model, inputs)).abs().max() > 1e-3


def test_layer_norm_after_rnn_is_inexact() -> None:
    model, inputs = randomize_(Seq(nn.LSTM, num_layers=2, head="layernorm")).double(), _x(*TxN)
    cg = build_channel_graph(model, inputs)
    (g,) = _unit_groups(cg)
    assert g.prunable and not g.exact and "LayerNorm" in g.inexact[0]
    with pytest.raises(InexactPruneError):
        prune_channels(cg, {g.name: [1, 2]})
    prune_channels(build_channel_graph(model, inputs), {g.name: [1, 2]}, allow_inexact=True)
    assert model.rnn.hidden_size == 4 and model.norm.normalized_shape == (4,)
    _check_attributes(model.rnn)
    _outputs(model, inputs)


@pytest.mark.parametrize(("model", "inputs", "reason"), [
    (StateFromInput, lambda: (_x(*TxN), _x(1, 3, 6)), "initial state comes from the model input 'h0'"),
    (ZerosState, lambda: _x(*TxN), "initial state 'zeros' is made by zeros"),
])
def test_initial_state_from_outside_blocks_units(model, inputs, reason: str) -> None:
    model, inputs = randomize_(model()).double(), inputs()
    cg = build_channel_graph(model, inputs)
    (g,) = _unit_groups(cg)
    assert not g.prunable and any(reason in r and "Fix:" in r for r in g.blocked), g.blocked
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(PruneError, match="not prunable"):
        prune_channels(cg, {g.id: [0]})
    with pytest.raises(SparsifyError, match=reason):
        Sparsifier(model, inputs, adapter="rnn_units", policy="gmp")
    assert model.rnn.hidden_size == 6 and all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_adapter_without_rnn_says_so() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(SparsifyError, match=r"no nn\.RNN/LSTM/GRU hidden units"):
        Sparsifier(model, torch.randn(2, 4), adapter="rnn_units", policy="gmp")


def test_adapter_skips_inexact_units() -> None:
    model = Seq(nn.LSTM, head="layernorm")
    with pytest.raises(SparsifyError, match="changes the network's function"):
        Sparsifier(model, torch.randn(7, 3, 5), adapter="rnn_units", policy="gmp")


def test_one_vector_per_layer_and_direction() -> None:
    model = Seq(nn.LSTM, hidden=8, num_layers=2, proj_size=5, bidirectional=True)
    sp = Sparsifier(model, torch.randn(7, 3, 5), adapter="rnn_units", policy="gmp")
    names = sorted(v.name for v in sp.vectors)
    layers = ["rnn.l0", "rnn.l0_reverse", "rnn.l1", "rnn.l1_reverse"]
    assert names == sorted(layers + [f"{n}.proj" for n in layers])
    v = next(v for v in sp.vectors if v.name == "rnn.l1_reverse")
    w = torch.cat([model.rnn.weight_ih_l1_reverse, model.rnn.weight_hh_l1_reverse], 1).detach()
    expected = w.view(4, 8, -1).pow(2).sum((0, 2)).sqrt()  # rows j, H+j, 2H+j, 3H+j
    torch.testing.assert_close(v.raw().detach(), expected)


def test_parametrized_weights_are_what_forward_uses() -> None:
    """nn.LSTM computes from ``_flat_weights``: masked units must really be zero in forward."""
    torch.manual_seed(0)
    model = LanguageModel(num_layers=2).double()
    ids = torch.randint(0, 20, (3, 9))
    reference = copy.deepcopy(model)
    dense = _outputs(model, ids)
    sp = Sparsifier(model, ids, adapter="rnn_units", policy="gmp")
    keep = np.ones(10, dtype=bool)
    keep[[1, 4, 7]] = False
    set_group_masks(sp.groups[0], keep)
    with torch.no_grad():
        for layer in ("l0", "l1"):
            for name in ("weight_ih_", "weight_hh_", "bias_ih_", "bias_hh_"):
                t = getattr(reference.rnn, name + layer)
                t.view(4, 10, -1)[:, ~keep] = 0
    soft = _outputs(model, ids)
    assert (soft - dense).abs().max() > 1e-3
    torch.testing.assert_close(soft, _outputs(reference, ids), rtol=0, atol=1e-12)


def _train(model: nn.Module, ids: torch.Tensor, sp: Sparsifier, steps: int, lr: float = 0.05) -> torch.optim.Optimizer:
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-3)
    for _ in range(steps):
        logits = model(ids[:, :-1])
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        sp.step()
    return opt


@pytest.mark.parametrize("policy", ["str", "gmp"])
def test_sparsifier_prunes_units_and_keeps_the_soft_function(policy: str) -> None:
    torch.manual_seed(0)
    model = LanguageModel(num_layers=2, proj_size=0).double()
    ids = torch.randint(0, 20, (4, 12))
    if policy == "str":
        with torch.no_grad():  # unit norms start around 1.4: spread them over 0.14 … 1.4 for the threshold 0.31
            for p in model.rnn.parameters():
                p.view(4, 10, -1).mul_(torch.linspace(0.1, 1.0, 10, dtype=p.dtype).view(1, 10, 1))
        config = {"kind": "str", "s_init": -0.8}
    else:
        config = {"kind": "gmp", "sparsity": 0.5, "end_step": 6, "update_every": 2}
    sp = Sparsifier(model, ids[:, :-1], adapter="rnn_units", policy=config)
    opt = _train(model, ids, sp, steps=8)
    zeros = sp.zero_structures()
    assert 0 < len(next(iter(zeros.values()))) < 10
    soft = _outputs(model, ids[:, :-1])
    result = sp.prune(optimizer=opt)
    assert model.rnn.hidden_size == 10 - len(next(iter(zeros.values())))
    assert result.params_after < result.params_before
    torch.testing.assert_close(_outputs(model, ids[:, :-1]), soft, rtol=0, atol=1e-10)
    _check_attributes(model.rnn)
    model.rnn.flatten_parameters()
    loss = model(ids[:, :-1]).logsumexp(-1).mean()  # the optimizer (momentum sliced) keeps working
    loss.backward()
    opt.step()


def test_prune_failure_restores_the_rnn() -> None:
    """A prune that fails (here: removing live units with verify_atol) leaves weights, hidden_size
    and the LSTM's _flat_weights as they were."""
    model, inputs = _build("lstm_proj")
    before = _outputs(model, inputs)
    params = {n: p for n, p in model.named_parameters()}
    cg = build_channel_graph(model, inputs)
    (g,) = _unit_groups(cg)
    with pytest.raises(PruneError):
        prune_channels(cg, {g.id: [0, 1]}, verify_atol=1e-9)
    assert (model.rnn.hidden_size, model.rnn.proj_size, model.rnn.input_size) == (8, 5, 7)
    assert all(p is params[n] for n, p in model.named_parameters())
    _check_attributes(model.rnn)
    torch.testing.assert_close(_outputs(model, inputs), before, rtol=0, atol=0)


def test_save_load_round_trip(tmp_path) -> None:
    model, ids = _build("language_model")
    result = check_exactness(model, ids)
    sparsify.save(model, tmp_path, result.report, ids)
    loaded = sparsify.load(lambda: LanguageModel(num_layers=2).double(), tmp_path)
    assert loaded.rnn.hidden_size == model.rnn.hidden_size
    torch.testing.assert_close(_outputs(loaded.eval(), ids), _outputs(model, ids), rtol=0, atol=0)


def test_constant_input_channels_are_not_folded_into_an_rnn() -> None:
    """A removed input channel that still carries a constant (a Linear's bias) would need folding into
    the RNN's biases, which sparsify does not do: pruning refuses instead of changing the function."""
    model, inputs = _build("lstm_2_layers")
    cg = build_channel_graph(model.eval(), inputs)
    (pre,) = [g for g in cg.groups if g.name == "pre"]
    plan = {pre.id: np.array([0, 2])}
    soft_zero_(model, cg.groups, plan, keep_bias=True)
    with pytest.raises(InexactPruneError, match="cannot absorb"):
        prune_channels(cg, plan)
    assert model.rnn.input_size == 7


@pytest.mark.parametrize("name", ["state_from_linear", "learned_state", "encoder_decoder", "lstm_proj"])
def test_sparsifier_zeroes_every_producer_of_a_unit(name: str) -> None:
    """Layers computing the initial state (and a second RNN sharing the units) are masked with the
    units: otherwise a removed unit would not start at 0 and pruning would change the function."""
    model, inputs = _build(name)
    sp = Sparsifier(model, inputs, adapter="rnn_units", policy={"kind": "gmp", "sparsity": 0.5})
    if name in ("state_from_linear", "learned_state"):
        assert any(v.name.endswith("/initial state") for v in sp.vectors)
    hidden = [r.hidden_size for r in _rnns(model)]
    sp.policy.finalize()
    soft = _outputs(model, inputs)
    sp.prune()
    assert [r.hidden_size for r in _rnns(model)] == [h // 2 for h in hidden]
    torch.testing.assert_close(_outputs(model, inputs), soft, rtol=0, atol=1e-10)
