"""Layers timed as deployed (measure.layer_timing) and the on-disk timing cache (measure.layer_cache)."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

import pytest
import torch
from torch import nn

from sparsify.deploy import deploy
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


class Residual(nn.Module):
    """conv→BN→add→ReLU (fused with the add), a sum of two convs (the first fuses), z += conv on a clone (traced
    as z + conv: fused), a broadcast add (left unfused)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.bn = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.b, self.c = nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 1)
        self.d, self.e = nn.Conv2d(8, 8, 1), nn.Conv2d(8, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.a(x)) + x)
        x = torch.relu(self.b(x) + self.c(x))
        z = x.clone()
        z += self.d(x)
        return torch.relu(z) + torch.relu(self.e(x) + x)


def _add_relu_convs(model: nn.Module, x: torch.Tensor) -> tuple[tuple[set[str], set[str]], tuple[set[str], set[str]]]:
    """((convs timed with a fused add+ReLU, convs timed without their merged bias), the same as deployed)."""
    lat = LatencyModel(build_channel_graph(model, x), step=4, latency_fn=lambda spec, i, o: 1.0)
    timed = ({s.name.removesuffix(".weight") for s in lat.layers if s.add_relu},
             {s.name.removesuffix(".weight") for s in lat.layers if s.bias_merged})
    fusions = deploy(model, x).sparsify_fusions
    return timed, ({f.conv for f in fusions if f.add is not None}, {f.bias_from for f in fusions if f.bias_from})


def test_a_residual_add_and_relu_are_read_as_deployment_fuses_them() -> None:
    x = torch.randn(2, 8, 6, 6)
    timed, deployed = _add_relu_convs(Residual().eval(), x)
    assert timed == deployed == ({"a", "b", "d"}, {"c"})  # c: its sum is b's (its bias moves there); e: broadcast
    cg = build_channel_graph(Residual().eval(), x)
    s = {spec.name: spec for spec in LatencyModel(cg, step=4, latency_fn=lambda spec, i, o: 1.0).layers}
    assert (s["a.weight"].folded_bn, s["a.weight"].relu, s["a.weight"].add_relu) == (True, False, True)
    assert s["a.weight"].signature(8, 8) != LayerSpec(**{**s["a.weight"].__dict__, "add_relu": False}).signature(8, 8)
    for in_context in (True, False):
        assert time_layer(s["a.weight"], 8, 8, batch=2, iters=2, warmup=1, in_context=in_context) > 0


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_torchvision_residual_convs_timed_with_their_add(tv: ModuleType, name: str) -> None:
    model = getattr(tv.models, name)(num_classes=10).eval()
    timed, deployed = _add_relu_convs(model, torch.randn(1, 3, 32, 32))
    assert timed == deployed and len(timed[0]) == {"resnet18": 8, "resnet50": 16}[name]
    assert timed[1] == {n for n, _ in model.named_modules() if n.endswith("downsample.0")} and len(timed[1]) >= 3


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
    cg = build_channel_graph(Residual().eval(), torch.randn(2, 8, 6, 6))
    residual = next(sp for sp in LatencyModel(cg, step=4, latency_fn=lambda sp, i, o: 1.0).layers if sp.add_relu)
    for cast_params in (False, True):  # conv+bias+add+ReLU through cuDNN's fused kernel
        assert time_layer(residual, 8, 8, batch=64, device="cuda", dtype=torch.bfloat16, cast_params=cast_params) > 0
    cg = build_channel_graph(Net().eval(), torch.randn(2, 3, 8, 8))
    lat = LatencyModel(cg, batch=16, device="cuda", step=8, grid_points=2, disk_cache=tmp_path / "t.json")
    assert lat.measured > 0 and (tmp_path / "t.json").is_file()
