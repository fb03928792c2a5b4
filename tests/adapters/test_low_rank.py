"""Low-rank factorisation modules, factorize_*, and the ``low_rank`` adapter."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from sparsify.adapters.low_rank import LowRankAdapter, LowRankConfig
from sparsify.graph.channel_graph import build_channel_graph
from sparsify.nn import LowRankConv2d, LowRankLinear, factorize_, factorize_conv2d, factorize_linear
from sparsify.prune.surgery import prune_channels
from sparsify.testing.oracle import check_exactness

D = torch.float64


class Net(nn.Module):
    """Two low-rank layers, then an MLP with a plain Linear→Dropout→Linear pair and a ReLU pair."""

    def __init__(self) -> None:
        super().__init__()
        self.lr1 = LowRankLinear(8, 12, 5)
        self.lr2 = LowRankLinear(12, 10, 4)
        self.fc1 = nn.Linear(10, 16)
        self.drop = nn.Dropout(0.1)
        self.fc2 = nn.Linear(16, 6)
        self.fc3 = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.lr2(F.relu(self.lr1(x))))
        return self.fc3(torch.relu(self.fc2(self.drop(self.fc1(h)))))


class Mask(nn.Module):
    """A fixed 0/1 mask: the simplest policy transform."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, raw: torch.Tensor) -> torch.Tensor:
        return raw * self.mask


def _net() -> tuple[Net, torch.Tensor]:
    model = Net().to(D).eval()
    with torch.no_grad():
        for m in (model.lr1, model.lr2):
            m.sigma.copy_(torch.linspace(2.0, 0.5, m.rank, dtype=D))
    return model, torch.randn(4, 8, dtype=D)


def _vectors(model: nn.Module, x: torch.Tensor):
    cg = build_channel_graph(model, x)
    adapter = LowRankAdapter(LowRankConfig())
    return cg, adapter, {v.name: v for v in adapter.vectors(cg)}


# ----- factorisation --------------------------------------------------------------------------------
def test_factorize_linear_full_rank_reproduces_dense() -> None:
    lin = nn.Linear(7, 5).to(D)
    low = factorize_linear(lin, rank=5)
    x = torch.randn(3, 2, 7, dtype=D)
    assert (low.U.shape, low.sigma.shape, low.V.shape) == ((5, 5), (5,), (5, 7))
    assert (low(x) - lin(x)).abs().max() <= 1e-10
    assert (low.dense_weight() - lin.weight).abs().max() <= 1e-10
    assert torch.all(low.sigma[:-1] >= low.sigma[1:])


def test_energy_picks_smallest_rank() -> None:
    s = torch.tensor([4.0, 2.0, 1.0, 0.5], dtype=D)  # σ² = 16, 4, 1, 0.25 of 21.25
    q1, _ = torch.linalg.qr(torch.randn(6, 4, dtype=D))
    q2, _ = torch.linalg.qr(torch.randn(5, 4, dtype=D))
    lin = nn.Linear(5, 6, bias=False).to(D)
    with torch.no_grad():
        lin.weight.copy_(q1 @ torch.diag(s) @ q2.T)
    for energy, rank in [(0.5, 1), (16 / 21.25, 1), (0.76, 2), (20 / 21.25, 2), (0.95, 3), (0.999, 4), (1.0, 4)]:
        low = factorize_linear(lin, energy=energy)
        assert low.rank == rank, energy
        assert torch.allclose(low.sigma, s[:rank])
    low = factorize_linear(lin, energy=0.9)
    assert float((low.dense_weight() - lin.weight).detach().norm()) ** 2 == pytest.approx(1.25, rel=1e-9)  # σ₃² + σ₄²


@pytest.mark.parametrize("kwargs, match", [
    ({}, "exactly one"), ({"rank": 2, "energy": 0.9}, "exactly one"), ({"rank": 0}, r"\[1, 4\]"),
    ({"rank": 5}, r"\[1, 4\]"), ({"energy": 0.0}, r"\(0, 1\]"), ({"energy": 1.5}, r"\(0, 1\]"),
])
def test_factorize_linear_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        factorize_linear(nn.Linear(4, 6), **kwargs)


def test_factorize_in_place() -> None:
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 5), nn.Linear(5, 3))).to(D)
    x = torch.randn(2, 6, dtype=D)
    ref = model(x)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"'2.1'.*\[1, 3\]"):
        factorize_(model, ["0", "2.1"], rank=4)  # fine for '0', too large for '2.1'
    assert isinstance(model[0], nn.Linear)  # nothing replaced
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match=r"not an nn\.Linear"):
        factorize_(model, ["1"], rank=1)
    with pytest.raises(ValueError, match="no submodule"):
        factorize_(model, "nope", rank=1)

    assert factorize_(model, "0", energy=1.0) == {"0": 6}
    assert factorize_(model, lambda name, m: m.out_features < 8, energy=1.0) == {"2.0": 5, "2.1": 3}
    assert isinstance(model[2][1], LowRankLinear)
    assert (model(x) - ref).abs().max() <= 1e-10


def test_factorize_conv2d_full_rank() -> None:
    conv = nn.Conv2d(3, 5, 3, stride=2, padding=1).to(D)
    low = factorize_conv2d(conv, rank=5)
    x = torch.randn(2, 3, 7, 7, dtype=D)
    assert (low(x) - conv(x)).abs().max() <= 1e-10


# ----- the rank dimension is a prunable, exact channel group -------------------------------------------
def test_oracle_low_rank_mlp() -> None:
    model, x = _net()
    result = check_exactness(model, x)
    assert result.max_abs_diff <= 1e-10
    for m in (model.lr1, model.lr2):
        assert m.rank < 4 and m.U.shape == (m.out_features, m.rank) and m.V.shape == (m.rank, m.in_features)
        assert m.sigma.shape == (m.rank,)


def test_oracle_low_rank_conv() -> None:
    model = nn.Sequential(LowRankConv2d(3, 8, 3, 4, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          LowRankConv2d(8, 5, 3, 3, stride=2)).to(D)
    result = check_exactness(model, torch.randn(2, 3, 8, 8, dtype=D))
    assert result.max_abs_diff <= 1e-10
    assert (model[0].rank, model[3].rank) == (2, 1)


def test_prune_zeroed_sigma_shrinks_factors() -> None:
    model, x = _net()
    cg = build_channel_graph(model, x)
    group = next(g for g in cg.groups if any(m.tensor == "lr1.sigma" for m in g.members))
    roles = {(m.tensor, m.dim): m.role for m in group.members}
    assert roles == {("lr1.V", 0): "out", ("lr1.sigma", 0): "value", ("lr1.U", 1): "in"}
    with torch.no_grad():
        model.lr1.sigma[[1, 3]] = 0.0  # σ only: V rows and U columns stay non-zero
    ref = model(x)
    prune_channels(cg, {group.id: [1, 3]})
    lr1 = model.lr1
    assert (lr1.rank, lr1.U.shape, lr1.sigma.shape, lr1.V.shape) == (3, (12, 3), (3,), (3, 8))
    assert (model(x) - ref).abs().max() <= 1e-12


# ----- the adapter ------------------------------------------------------------------------------------
def test_adapter_sigma_vectors() -> None:
    model, x = _net()
    _, adapter, vectors = _vectors(model, x)
    assert set(vectors) == {"lr1", "lr2", "fc1"}  # σ of both layers; fc1→Dropout→fc2 is a factor pair
    for name in ("lr1", "lr2"):
        v = vectors[name]
        module = model.get_submodule(name)
        assert len(v) == module.rank and v.raw() is module.sigma
        assert np.array_equal(v.entries, np.arange(module.rank))
        assert v.params_per_entry[0] == module.in_features + module.out_features + 1
    assert "Identity/Dropout" in adapter.skipped["fc2"]  # fc2 → relu → fc3


def test_install_mask_then_bake_then_prune() -> None:
    model, x = _net()
    cg, adapter, vectors = _vectors(model, x)
    v = vectors["lr1"]
    mask = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0], dtype=D)
    expected_model = copy.deepcopy(model)
    with torch.no_grad():
        expected_model.lr1.sigma.mul_(mask)
    expected = expected_model(x)

    transform = Mask(mask)
    adapter.install(v, transform)
    assert parametrize.is_parametrized(model.lr1, "sigma")
    assert any(m is transform for m in model.modules())  # a submodule of the parametrization
    assert torch.equal(v.effective(), v.raw() * mask)
    assert (model(x) - expected).abs().max() <= 1e-12
    model(x).sum().backward()  # gradients reach the raw σ through the transform
    assert model.lr1.parametrizations.sigma.original.grad[1] == 0.0

    adapter.bake(v)
    assert not parametrize.is_parametrized(model.lr1)
    assert torch.equal(model.lr1.sigma.detach() == 0, mask == 0)
    prune_channels(cg, {v.group.id: v.entries[(mask == 0).numpy()]})
    assert model.lr1.rank == 3
    assert (model(x) - expected).abs().max() <= 1e-10


def test_linear_pair_covered() -> None:
    model, x = _net()
    cg, adapter, vectors = _vectors(model, x)
    v = vectors["fc1"]
    expected_raw = model.fc1.weight.norm(dim=1) * model.fc2.weight.norm(dim=0)
    assert torch.allclose(v.raw(), expected_raw)
    assert v.params_per_entry[0] == 10 + 1 + 6

    mask = (torch.arange(16) % 3 != 0).to(D)
    expected_model = copy.deepcopy(model)
    with torch.no_grad():
        expected_model.fc1.weight.mul_(mask[:, None])
        expected_model.fc1.bias.mul_(mask)
    expected = expected_model(x)
    adapter.install(v, Mask(mask))
    assert torch.allclose(v.effective(), expected_raw * mask)
    assert (model(x) - expected).abs().max() <= 1e-12

    adapter.bake(v)
    assert not parametrize.is_parametrized(model.fc1)
    assert torch.allclose(model.fc1.weight, expected_model.fc1.weight)
    report = prune_channels(cg, {v.group.id: v.entries[(mask == 0).numpy()]})
    assert report.widths["fc1"] == (16, 10) and model.fc1.out_features == 10
    assert (model(x) - expected).abs().max() <= 1e-10


def test_linear_relu_linear_not_covered() -> None:
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3)).to(D)
    _, adapter, vectors = _vectors(model, torch.randn(2, 5, dtype=D))
    assert vectors == {}
    assert "ReLU" in adapter.skipped["0"] or "1 (call_module)" in adapter.skipped["0"]
    assert "only Identity/Dropout" in adapter.skipped["0"]


def test_config() -> None:
    assert LowRankConfig().kind == "low_rank"
    with pytest.raises(ValueError):
        LowRankConfig(unknown=1)
