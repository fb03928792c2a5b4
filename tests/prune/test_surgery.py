"""Surgery: atomicity, clear errors, tracing leaves the model alone, optimizer state is sliced."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from sparsify import build_channel_graph, prune_channels
from sparsify.errors import InexactPruneError, PruneError, TraceError
from sparsify.prune import attributes


class Net(nn.Module):
    """conv-bn-relu → 3×3 conv → residual → linear head, plus a LayerNorm'd MLP branch."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.norm = nn.LayerNorm(8)
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = y + self.conv2(y)
        y = self.norm(self.pool(y).flatten(1))
        return self.fc2(torch.relu(self.fc1(y)))


def _state(model: nn.Module) -> dict:
    tensors = {k: v.clone() for k, v in model.state_dict().items()}
    attrs = {n: {k: v for k, v in vars(m).items() if not k.startswith("_")} for n, m in model.named_modules()}
    return {"tensors": tensors, "attrs": copy.deepcopy(attrs), "training": [m.training for m in model.modules()]}


def _assert_same(a: dict, b: dict) -> None:
    assert a["tensors"].keys() == b["tensors"].keys()
    for k in a["tensors"]:
        assert torch.equal(a["tensors"][k], b["tensors"][k]), k
    assert a["attrs"] == b["attrs"]
    assert a["training"] == b["training"]


def _group_of(cg, module: str):
    return next(g for g in cg.groups if any(m.module == module and m.role == "out" for m in g.members))


def test_tracing_leaves_model_unchanged() -> None:
    model = Net().train()
    before = _state(model)
    build_channel_graph(model, torch.randn(2, 3, 8, 8))
    _assert_same(before, _state(model))
    assert model.training


def test_failure_mid_surgery_restores_everything(monkeypatch: pytest.MonkeyPatch) -> None:
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    opt.step()
    before = _state(model)
    momentum = {id(p): opt.state[p]["momentum_buffer"].clone() for p in model.parameters()}
    cg = build_channel_graph(model, torch.randn(2, 3, 8, 8))
    calls = {"n": 0}
    real = attributes.sync_attributes

    def failing(module: nn.Module, old: dict) -> None:
        calls["n"] += 1
        if calls["n"] == 2:  # after some tensors and one module were already changed
            raise RuntimeError("injected failure")
        real(module, old)

    monkeypatch.setattr("sparsify.prune.surgery.sync_attributes", failing)
    plan = {_group_of(cg, "conv1").id: [0, 1, 2], _group_of(cg, "fc1").id: [0, 5]}
    with pytest.raises(PruneError, match="injected failure"):
        prune_channels(cg, plan, optimizer=opt, allow_inexact=True)
    _assert_same(before, _state(model))
    for p in model.parameters():
        assert torch.equal(opt.state[p]["momentum_buffer"], momentum[id(p)])


def test_optimizer_state_is_sliced_and_training_continues() -> None:
    x = torch.randn(2, 3, 8, 8)
    model = Net()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(x).sum().backward()
    opt.step()
    cg = build_channel_graph(model, x)
    exp_avg = opt.state[model.fc1.weight]["exp_avg"].clone()
    prune_channels(cg, {_group_of(cg, "fc1").id: [1, 3]}, optimizer=opt)
    keep = [i for i in range(16) if i not in (1, 3)]
    assert torch.equal(opt.state[model.fc1.weight]["exp_avg"], exp_avg[keep])
    assert opt.state[model.fc2.weight]["exp_avg"].shape == model.fc2.weight.shape
    opt.zero_grad()
    model(x).sum().backward()
    opt.step()  # shapes agree: no error


def test_pruning_every_channel_is_refused_and_model_untouched() -> None:
    model = Net()
    before = _state(model)
    cg = build_channel_graph(model, torch.randn(2, 3, 8, 8))
    g = _group_of(cg, "fc1")
    with pytest.raises(PruneError, match="keep at least one"):
        prune_channels(cg, {g.id: range(g.width)})
    _assert_same(before, _state(model))


def test_out_of_range_and_unprunable_groups_are_refused() -> None:
    model = Net()
    cg = build_channel_graph(model, torch.randn(2, 3, 8, 8))
    g = _group_of(cg, "fc1")
    with pytest.raises(PruneError, match="outside"):
        prune_channels(cg, {g.id: [g.width]})
    output = next(g for g in cg.groups if not g.prunable)
    with pytest.raises(PruneError, match="not prunable"):
        prune_channels(cg, {output.id: [0]})


def test_layer_norm_group_needs_allow_inexact() -> None:
    model = Net()
    cg = build_channel_graph(model, torch.randn(2, 3, 8, 8))
    residual = _group_of(cg, "conv1")
    assert residual.prunable and not residual.exact
    assert "LayerNorm" in residual.inexact[0]
    with pytest.raises(InexactPruneError, match="allow_inexact"):
        prune_channels(cg, {residual.id: [0]})
    prune_channels(cg, {residual.id: [0]}, allow_inexact=True)
    assert model.conv1.out_channels == 7 and model.norm.normalized_shape == (7,)
    model(torch.randn(2, 3, 8, 8))


def test_stale_graph_is_refused() -> None:
    model = Net()
    cg = build_channel_graph(model, torch.randn(2, 3, 8, 8))
    g = _group_of(cg, "fc1")
    prune_channels(cg, {g.id: [0]})
    with pytest.raises(PruneError, match="build_channel_graph"):
        prune_channels(cg, {g.id: [0]})


def test_unfoldable_constant_is_refused_without_allow_inexact() -> None:
    """A BN with γ = 0 but β ≠ 0 feeds a padded 3×3 conv: folding β there is not exact."""

    class PaddedConsumer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(3, 4, 1)
            self.bn = nn.BatchNorm2d(4)
            self.conv2 = nn.Conv2d(4, 2, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv2(torch.relu(self.bn(self.conv1(x))))

    model = PaddedConsumer().eval()
    with torch.no_grad():
        model.bn.weight[1] = 0.0
        model.bn.bias[1] = 0.5
    before = _state(model)
    cg = build_channel_graph(model, torch.randn(2, 3, 6, 6))
    g = _group_of(cg, "conv1")
    with pytest.raises(InexactPruneError, match="border"):
        prune_channels(cg, {g.id: [1]})
    _assert_same(before, _state(model))


def test_bias_folding_into_linear_is_exact() -> None:
    model = Net().eval().double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        model.fc1.weight[[2, 7]] = 0.0  # fc1 rows zero but biases stay: relu(b) reaches fc2
        model.fc1.bias[[2, 7]] = torch.tensor([0.3, 0.8], dtype=torch.float64)
    ref = model(x)
    cg = build_channel_graph(model, x)
    report = prune_channels(cg, {_group_of(cg, "fc1").id: [2, 7]})
    assert report.folds and report.folds[0].module == "fc2"
    assert torch.allclose(model(x), ref, atol=1e-12, rtol=0)


def test_wrong_example_inputs_give_a_clear_error() -> None:
    model = Net()
    before = _state(model)
    with pytest.raises(TraceError, match="example_inputs"):
        build_channel_graph(model, torch.randn(2, 5, 8, 8))
    with pytest.raises(TraceError, match="tensor, a tuple"):
        build_channel_graph(model, "not a tensor")
    _assert_same(before, _state(model))


def test_untraceable_model_names_the_fix() -> None:
    class DataDependent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 0:
                return self.fc(x)
            return x

    with pytest.raises(TraceError, match="register_leaf_module"):
        build_channel_graph(DataDependent(), torch.randn(2, 4))


def test_structure_indices_accept_numpy_and_refuse_duplicates() -> None:
    model = Net()
    cg = build_channel_graph(model, torch.randn(2, 3, 8, 8))
    g = _group_of(cg, "fc1")
    with pytest.raises(PruneError, match=r"lists indices \[3\] more than once"):
        prune_channels(cg, {g.id: np.array([3, 3, 4])})
    report = prune_channels(cg, {g.id: np.array([3, 4])})
    assert report.removed[g.name] == 2
    assert model.fc1.out_features == 14 and model.fc2.in_features == 14
