"""Layers timed as deployed (measure.layer_timing) and the on-disk timing cache (measure.layer_cache)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from sparsify.graph.channel_graph import build_channel_graph
from sparsify.measure.latency_model import LatencyModel
from sparsify.measure.layer_cache import LayerTimingCache, cache_dir
from sparsify.measure.layer_timing import LayerSpec, time_layer


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.bn, self.act = nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU()
        self.b = nn.Conv2d(16, 16, 3, padding=1)  # functional ReLU, no BN
        self.c = nn.Conv2d(16, 16, 1)  # feeds an add: alone
        self.d = nn.Conv2d(16, 8, 1, bias=False)
        self.bn_d = nn.BatchNorm2d(8)  # BN without ReLU

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.bn(self.a(x)))
        x = torch.relu(self.b(x))
        x = x + self.c(x)
        return self.bn_d(self.d(x))


def specs() -> dict[str, LayerSpec]:
    cg = build_channel_graph(Net().eval(), torch.randn(2, 3, 8, 8))
    lat = LatencyModel(cg, step=4, latency_fn=lambda spec, i, o: 1.0 + 0.01 * i * o)
    return {s.name: s for s in lat.layers}


def test_the_deployed_epilogue_is_read_from_the_trace() -> None:
    s = specs()
    assert (s["a.weight"].folded_bn, s["a.weight"].relu) == (True, True)
    assert (s["b.weight"].folded_bn, s["b.weight"].relu) == (False, True)
    assert (s["c.weight"].folded_bn, s["c.weight"].relu) == (False, False)
    assert (s["d.weight"].folded_bn, s["d.weight"].relu) == (True, False)
    assert s["a.weight"].signature(3, 16) != LayerSpec(**{**s["a.weight"].__dict__, "relu": False}).signature(3, 16)


def test_time_layer_in_context_and_alone_on_cpu() -> None:
    spec = specs()["a.weight"]
    for in_context in (True, False):
        ms = time_layer(spec, 3, 8, batch=2, iters=2, warmup=1, in_context=in_context)
        assert ms > 0
    assert time_layer(spec, 3, 8, batch=2, iters=2, warmup=0, dtype=torch.bfloat16, cast_params=True) > 0


def test_disk_cache_times_each_configuration_once(tmp_path: Path) -> None:
    cg = build_channel_graph(Net().eval(), torch.randn(2, 3, 8, 8))
    path = tmp_path / "timings.json"
    first = LatencyModel(cg, device="cpu", step=8, grid_points=2, iters=1, warmup=0, disk_cache=path)
    assert first.measured > 0 and path.is_file() and first.disk_cache_path == str(path)
    data = json.loads(path.read_text())
    assert data["setting"]["torch"] == torch.__version__ and data["setting"]["batch"] == 2
    assert len(data["timings"]) == first.measured
    again = LatencyModel(cg, device="cpu", step=8, grid_points=2, iters=1, warmup=0, disk_cache=path)
    assert again.measured == 0 and again.total == pytest.approx(first.total)
    other = LatencyModel(cg, batch=3, device="cpu", step=8, grid_points=2, iters=1, warmup=0, disk_cache=path)
    assert other.measured > 0  # another setting: the file's timings are not reused


def test_cache_files_are_named_by_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPARSIFY_CACHE_DIR", str(tmp_path))
    assert cache_dir() == tmp_path
    dev = torch.device("cpu")
    one, two = LayerTimingCache(dev, {"batch": 1}), LayerTimingCache(dev, {"batch": 2})
    assert one.path.parent == tmp_path / "latency" and one.path != two.path
    one.put(("conv", 3), 1.5)
    one.save()
    assert LayerTimingCache(dev, {"batch": 1}).get(("conv", 3)) == 1.5
    assert LayerTimingCache(dev, {"batch": 2}).get(("conv", 3)) is None
    one.path.write_text("not json")
    assert LayerTimingCache(dev, {"batch": 1}).get(("conv", 3)) is None  # a broken file is ignored


def test_no_disk_cache_by_default_on_cpu_or_with_a_latency_fn() -> None:
    cg = build_channel_graph(Net().eval(), torch.randn(2, 3, 8, 8))
    assert LatencyModel(cg, step=8, latency_fn=lambda s, i, o: 1.0).disk_cache_path is None
    assert LatencyModel(cg, device="cpu", step=8, grid_points=2, iters=1, warmup=0).disk_cache_path is None


@pytest.mark.gpu
def test_fused_conv_relu_is_timed_on_cuda(tmp_path: Path) -> None:
    spec = specs()["a.weight"]
    fused = time_layer(spec, 3, 16, batch=64, device="cuda", dtype=torch.bfloat16)
    alone = time_layer(spec, 3, 16, batch=64, device="cuda", dtype=torch.bfloat16, in_context=False)
    assert fused > 0 and alone > 0
    cg = build_channel_graph(Net().eval(), torch.randn(2, 3, 8, 8))
    lat = LatencyModel(cg, batch=16, device="cuda", step=8, grid_points=2, disk_cache=tmp_path / "t.json")
    assert lat.measured > 0 and (tmp_path / "t.json").is_file()
