"""MACs of nn.RNN / nn.LSTM / nn.GRU: ``module_macs``, ``MacsModel`` and ``unit="macs"`` budgets on RNN units."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from sparsify import GMPConfig, Sparsifier, build_channel_graph, prune_channels
from sparsify.graph.cost import MacsModel, module_macs
from sparsify.graph.trace import trace
from sparsify.testing.oracle import check_exactness, random_plan, randomize_

GATES = {nn.LSTM: 4, nn.GRU: 3, nn.RNN: 1}


class Seq(nn.Module):
    """x → Linear → RNN → Linear(output)."""

    def __init__(self, cls=nn.LSTM, features: int = 5, inner: int = 7, hidden: int = 6, **kw) -> None:
        super().__init__()
        self.pre = nn.Linear(features, inner)
        self.rnn = cls(inner, hidden, **kw)
        self.fc = nn.Linear((2 if kw.get("bidirectional") else 1) * (kw.get("proj_size") or hidden), 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.pre(x))
        return self.fc(out)


class LanguageModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.rnn = nn.LSTM(8, 10, num_layers=2, batch_first=True)
        self.fc = nn.Linear(10, 20)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.fc(self.rnn(self.emb(ids))[0])


def _x(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64)


T, N = 7, 3


def _input(batch_first: bool = False, unbatched: bool = False) -> torch.Tensor:
    return _x(T, 5) if unbatched else _x(N, T, 5) if batch_first else _x(T, N, 5)


@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU, nn.RNN])
@pytest.mark.parametrize("layout", ["time_first", "batch_first", "unbatched"])
def test_single_layer_hand_count(cls, layout: str) -> None:
    """gates·H·I + gates·H·H per step and sequence; dim 0 of the output divided out, as for the Linears."""
    model = Seq(cls, batch_first=layout == "batch_first").double()
    macs = module_macs(trace(model, _input(layout == "batch_first", layout == "unbatched")))
    rows = {"time_first": N, "batch_first": T, "unbatched": 1}[layout]  # per row of dim 0 of every output
    g = GATES[cls]
    assert macs == {"pre.weight": rows * 7 * 5, "rnn.weight_ih_l0": rows * g * 6 * 7,
                    "rnn.weight_hh_l0": rows * g * 6 * 6, "fc.weight": rows * 6 * 3}


def test_lstm_proj_bidirectional_hand_count() -> None:
    """With proj_size P: weight_hh is gates·H × P, weight_hr is P × H, layer 1 reads both directions (2P)."""
    model = Seq(nn.LSTM, hidden=8, num_layers=2, proj_size=5, bidirectional=True, batch_first=True).double()
    macs = module_macs(trace(model, _input(batch_first=True)))
    expected = {"pre.weight": T * 7 * 5, "fc.weight": T * 10 * 3}
    for sfx in ("", "_reverse"):
        expected |= {f"rnn.weight_ih_l0{sfx}": T * 32 * 7, f"rnn.weight_ih_l1{sfx}": T * 32 * 10}
        expected |= {f"rnn.weight_hh_l{k}{sfx}": T * 32 * 5 for k in (0, 1)}
        expected |= {f"rnn.weight_hr_l{k}{sfx}": T * 5 * 8 for k in (0, 1)}
    assert macs == expected


def test_rnn_share_of_macs_does_not_depend_on_the_layout() -> None:
    """The same network on the same data, time first or batch first: the RNN carries the same share."""
    torch.manual_seed(0)
    model = Seq(nn.GRU, num_layers=2, bidirectional=True).double()
    x = _input()
    share = []
    for batch_first, inputs in ((False, x), (True, x.transpose(0, 1).contiguous())):
        model.rnn.batch_first = batch_first
        macs = module_macs(trace(model, inputs))
        share.append(sum(v for k, v in macs.items() if k.startswith("rnn.")) / sum(macs.values()))
    assert 0.5 < share[0] < 1 and share[0] == pytest.approx(share[1], rel=1e-12)


CASES = {
    "lstm_2_layers": (lambda: Seq(nn.LSTM, num_layers=2), lambda: _input()),
    "lstm_bidirectional_batch_first": (lambda: Seq(nn.LSTM, num_layers=2, bidirectional=True, batch_first=True),
                                       lambda: _input(batch_first=True)),
    "lstm_proj": (lambda: Seq(nn.LSTM, hidden=8, num_layers=2, proj_size=5, bidirectional=True), lambda: _input()),
    "lstm_unbatched": (lambda: Seq(nn.LSTM, num_layers=2, bidirectional=True), lambda: _input(unbatched=True)),
    "gru_3_layers_bidirectional": (lambda: Seq(nn.GRU, num_layers=3, bidirectional=True), lambda: _input()),
    "gru_no_bias_batch_first": (lambda: Seq(nn.GRU, bias=False, batch_first=True), lambda: _input(batch_first=True)),
    "rnn_relu": (lambda: Seq(nn.RNN, num_layers=2, nonlinearity="relu"), lambda: _input()),
    "language_model": (LanguageModel, lambda: torch.randint(0, 20, (N, 9))),
}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("seed", [0, 1])
def test_macs_model_matches_the_pruned_rnn(name: str, seed: int) -> None:
    torch.manual_seed(seed)
    build, inputs = CASES[name]
    model, x = randomize_(build()).double().eval(), inputs()
    cg = build_channel_graph(model, x)
    mm = MacsModel(cg)
    plan = random_plan(cg, 0.4, seed=seed)
    units = [g for g in cg.groups if g.kind in ("rnn_unit", "rnn_proj")]
    assert units and all(g.id in plan for g in units)
    keep = {}
    for gid, removed in plan.items():
        keep[gid] = np.ones(cg.group(gid).width, dtype=bool)
        keep[gid][removed] = False
    predicted = mm.after(keep)
    before = module_macs(cg.traced)
    prune_channels(cg, plan)
    after = module_macs(trace(model, x))
    assert predicted < 0.8 * mm.total
    assert predicted == pytest.approx(sum(after.values()), rel=1e-12)
    rnn_weights = [k for k in before if k.startswith("rnn.")]
    assert rnn_weights and all(after[k] < before[k] for k in rnn_weights)  # every RNN weight got cheaper


def _restore_one(keep: np.ndarray) -> np.ndarray:
    more = keep.copy()
    more[np.flatnonzero(~keep)[0]] = True
    return more


@pytest.mark.parametrize(("name", "budget", "target"), [
    ("lstm_bidirectional_batch_first", "global", 0.5),
    ("gru_3_layers_bidirectional", "uniform", 0.3),
    ("language_model", "global", 0.4),
])
def test_gmp_reaches_an_exact_macs_target_on_rnn_units(name: str, budget: str, target: float) -> None:
    """The budget removes the fewest units whose exact MACs reach ``target``: one unit fewer falls short
    (all units of a module cost the same), and pruning is still exact."""
    torch.manual_seed(0)
    build, inputs = CASES[name]
    model, x = randomize_(build()).double(), inputs()
    sp = Sparsifier(model, x, adapter="rnn_units", policy=GMPConfig(
        sparsity=target, unit="macs", budget=budget, start_step=0, end_step=1, update_every=1))
    sp.step()
    sp.policy.finalize()
    (group,) = [g for g in sp.graph.groups if g.kind == "rnn_unit"]
    zeros = sp.zero_structures()[group.id]
    keep = np.ones(group.width, dtype=bool)
    keep[zeros] = False
    mm = sp.macs_model
    assert sum(v for k, v in mm.macs.items() if k.startswith("rnn.")) > 0.5 * mm.total  # the RNN is most of it
    assert 1 - mm.after({group.id: keep}) / mm.total >= target
    assert 1 - mm.after({group.id: _restore_one(keep)}) / mm.total < target
    model.eval()
    with torch.no_grad():
        soft = model(x)
    result = sp.prune()
    assert model.rnn.hidden_size == group.width - len(zeros)
    assert result.macs_after == pytest.approx(mm.after({group.id: keep}), rel=1e-12)
    assert 1 - result.macs_after / result.macs_before >= target
    with torch.no_grad():
        torch.testing.assert_close(model(x), soft, rtol=0, atol=1e-10)
    again = check_exactness(model, x)  # the pruned RNN still prunes exactly
    assert again.groups_pruned and again.max_abs_diff <= 1e-9 * (1 + again.output_scale)
