"""Two layers exported, the others replicated (graph/repeated_layers.py): the same graph as the full export,
or the full export where the layers are not alike."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sparsify import build_channel_graph
from sparsify.graph import repeated_layers as rl
from sparsify.graph import trace as trace_module
from sparsify.testing.oracle import check_exactness


class Block(nn.Module):
    def __init__(self, index: int, odd: int | None) -> None:
        super().__init__()
        self.layer_idx, self.odd = index, odd
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.layer_idx == self.odd:  # Python-level: invisible to the graphs of layers 0 and 1
            x = x * 2
        return x + self.fc2(torch.relu(self.fc1(x)))


class Net(nn.Module):
    def __init__(self, n: int, odd: int | None = None) -> None:
        super().__init__()
        self.inp, self.out = nn.Linear(4, 8), nn.Linear(8, 3)
        self.layers = nn.ModuleList(Block(i, odd) for i in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        width = int(x.shape[-1])  # torch.fx cannot trace int() of a size; torch.export can
        h = self.inp(x[..., :width])
        for layer in self.layers:
            h = layer(h)
        return self.out(h)


def _net_layers(model: nn.Module) -> str | None:
    return "layers" if isinstance(model, Net) else None


@pytest.fixture
def registered():
    rl.register_repeated_layers(_net_layers)
    yield
    rl.REPEATED_LAYERS.remove(_net_layers)


@pytest.fixture
def exported_layers(monkeypatch):
    """The number of layers each torch.export call saw."""
    seen: list[int] = []
    real = trace_module._export

    def spy(model, args, kwargs):
        seen.append(len(model.layers))
        return real(model, args, kwargs)

    monkeypatch.setattr(trace_module, "_export", spy)
    return seen


def _full(model: nn.Module, x: torch.Tensor):
    saved = list(rl.REPEATED_LAYERS)
    rl.REPEATED_LAYERS.clear()
    try:
        return build_channel_graph(model, x)
    finally:
        rl.REPEATED_LAYERS.extend(saved)


def _names(cg) -> list[str]:
    return [n.name for n in cg.traced.graph.nodes]


def test_replicated_graph_equals_full_export(registered, exported_layers):
    model, x = Net(5).double().eval(), torch.randn(2, 4, dtype=torch.float64)
    fast = build_channel_graph(model, x)
    assert exported_layers == [2]  # only the cut model was exported
    full = _full(model, x)
    assert _names(fast) == _names(full)
    assert fast.signature_rows() == full.signature_rows()
    assert torch.equal(fast.traced.graph_module(x), model(x))
    assert len(model.layers) == 5


def test_replicated_graph_passes_the_oracle(registered, exported_layers):
    torch.manual_seed(0)
    result = check_exactness(Net(4).double(), torch.randn(3, 4, dtype=torch.float64))
    assert exported_layers == [2]
    assert result.groups_pruned > 0 and result.max_abs_diff <= 1e-9


def test_layer_that_differs_in_python_falls_back_to_the_full_export(registered, exported_layers):
    model, x = Net(4, odd=3).double().eval(), torch.randn(2, 4, dtype=torch.float64)
    wrong = rl.export_replicated(model, "layers", lambda m: trace_module._export(m, (x,), {}))
    assert wrong is not None and not torch.allclose(wrong(x), model(x))  # layers 0 and 1 alike, layer 3 not
    exported_layers.clear()
    cg = build_channel_graph(model, x)
    assert exported_layers == [2, 4]  # the replicated graph's output differed from the model's
    assert torch.equal(cg.traced.graph_module(x), model(x))
    assert cg.signature_rows() == _full(model, x).signature_rows()


def test_layers_not_alike_are_not_replicated(registered):
    model = Net(4)
    assert rl.repeated_layers(model) == "layers"
    model.layers[2].fc1 = nn.Linear(8, 12)
    model.layers[2].fc2 = nn.Linear(12, 8)
    assert rl.repeated_layers(model) is None
    hooked = Net(4)
    hooked.layers[1].register_forward_hook(lambda *a: None)
    assert rl.repeated_layers(hooked) is None
    assert rl.repeated_layers(Net(2)) is None  # two layers: nothing to save
    assert rl.repeated_layers(Net(4).to("meta")) is None  # outputs cannot be checked on the meta device
