"""Pools in the latency model (measure.pooling): their width follows the layer before them."""

from __future__ import annotations

from types import ModuleType

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsify.graph.channel_graph import build_channel_graph
from sparsify.measure.latency_model import LatencyModel
from sparsify.measure.layer_timing import LayerSpec, time_layer


class Pools(nn.Module):
    """A module pool after conv→BN→ReLU, a functional one after a conv, an avg pool after an add (not modelled)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.bn, self.pool = nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.MaxPool2d(2)
        self.b, self.c = nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(16, 16, 1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.bn(self.a(x))))
        x = F.max_pool2d(self.b(x), kernel_size=2, stride=2)
        x = F.avg_pool2d(x + self.c(x), 2)
        return self.fc(x.mean((2, 3)))


def _fake(spec: LayerSpec, i: int, o: int) -> float:
    return 0.01 * o if spec.follows else 1.0 + 0.001 * i * o  # a pool: linear in its width


def _model(model: nn.Module, x: torch.Tensor, **kw: object) -> LatencyModel:
    return LatencyModel(build_channel_graph(model.eval(), x), step=4, latency_fn=_fake, **kw)


def test_pools_follow_their_producer() -> None:
    lat = _model(Pools(), torch.randn(2, 3, 16, 16))
    pools = {s.name: s for s in lat.layers if s.follows}
    assert set(pools) == {"pool", "max_pool2d"}  # the avg pool after the add has no single producer
    assert pools["pool"].follows == "a.weight" and pools["max_pool2d"].follows == "b.weight"
    assert pools["pool"].op == pools["max_pool2d"].op == "max_pool2d" and pools["max_pool2d"].stride == (2, 2)
    i = [s.name for s in lat.layers].index("pool")
    producer = [s.name for s in lat.layers].index("a.weight")
    assert lat._dims[i][0][0] == lat._dims[producer][0][0]  # the producer's output group
    assert i in lat.layers_of[lat._dims[i][0][0]]
    assert len(_model(Pools(), torch.randn(2, 3, 16, 16), pools=False).layers) == len(lat.layers) - 2


def test_a_narrower_producer_makes_its_pool_cheaper(tv: ModuleType) -> None:
    lat = _model(tv.models.resnet18(num_classes=10), torch.randn(1, 3, 64, 64))
    names = [s.name for s in lat.layers]
    pool = names.index("maxpool")
    assert lat.layers[pool].follows == "conv1.weight"
    gid, structure_of = lat._dims[pool][0]
    keep = np.ones(int(np.max(structure_of)) + 1, dtype=bool)
    keep[: len(keep) // 2] = False
    assert lat.widths(pool, {gid: keep}) == (32, 32)
    assert lat.layer_ms(pool, 32, 32) == pytest.approx(0.32) and lat.layer_ms(pool, 64, 64) == pytest.approx(0.64)
    assert lat.after({gid: keep}) < lat.total


def test_time_a_pool_on_cpu() -> None:
    spec = LayerSpec("pool", "max_pool2d", 16, 16, (16, 8, 8), (3, 3), (2, 2), (1, 1), (1, 1), bias=False,
                     follows="a.weight")
    assert spec.in_at(16, 8) == 8 and spec.macs_at(8, 8) == 0
    assert time_layer(spec, 8, 8, batch=2, iters=2, warmup=1) > 0
    avg = LayerSpec("p", "avg_pool2d", 16, 16, (16, 8, 8), (2, 2), (2, 2), (0, 0), (1, 1), bias=False, follows="a")
    assert time_layer(avg, 16, 16, batch=2, iters=2, warmup=0, dtype=torch.bfloat16) > 0
