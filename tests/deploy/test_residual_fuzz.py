"""Property test: random residual networks (conv → [BN] → [ReLU] → conv → [BN], shortcut identity or a projection
conv [+BN] computed before or after the branch, the sum written a + b, b + a, a += b or torch.add, then ReLU,
ReLU6 or nothing, pools here and there). Deploy keeps the outputs, merges every residual bias it can, and the
latency model times exactly what deploy fused and merged, with the activation's cap."""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from sparsify.deploy import deploy
from sparsify.graph.channel_graph import build_channel_graph
from sparsify.measure.latency_model import LatencyModel

EXAMPLES = max(int(os.environ.get("SPARSIFY_FUZZ_EXAMPLES", "300")) // 3, 10)

_block = st.fixed_dictionaries({
    "width": st.sampled_from([8, 16]), "stride": st.sampled_from([1, 2]), "k1": st.sampled_from([1, 3]),
    "k2": st.sampled_from([1, 3]), "bn1": st.booleans(), "relu1": st.booleans(), "bn2": st.booleans(),
    "bias2": st.booleans(), "project": st.booleans(), "proj_bn": st.booleans(), "proj_bias": st.booleans(),
    "shortcut_first": st.booleans(), "add": st.sampled_from(["a+b", "b+a", "a+=b", "torch.add"]),
    "act": st.sampled_from(["relu", "relu_fn", "relu6", "none"]), "pool": st.sampled_from(["none", "max", "avg"]),
})


class Block(nn.Module):
    def __init__(self, c_in: int, cfg: dict[str, Any]) -> None:
        super().__init__()
        c, s = cfg["width"], cfg["stride"]
        self.cfg = cfg
        self.project = cfg["project"] or c != c_in or s != 1
        self.conv1 = nn.Conv2d(c_in, c, cfg["k1"], s, cfg["k1"] // 2, bias=not cfg["bn1"])
        self.bn1 = nn.BatchNorm2d(c) if cfg["bn1"] else nn.Identity()
        self.conv2 = nn.Conv2d(c, c, cfg["k2"], 1, cfg["k2"] // 2, bias=cfg["bias2"])
        self.bn2 = nn.BatchNorm2d(c) if cfg["bn2"] else nn.Identity()
        if self.project:
            self.proj = nn.Conv2d(c_in, c, 1, s, bias=cfg["proj_bias"])
            self.proj_bn = nn.BatchNorm2d(c) if cfg["proj_bn"] else nn.Identity()
        self.act = {"relu": nn.ReLU(), "relu6": nn.ReLU6()}.get(cfg["act"], nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        shortcut = self.proj_bn(self.proj(x)) if self.project and cfg["shortcut_first"] else None
        h = self.bn1(self.conv1(x))
        h = F.relu(h) if cfg["relu1"] else h
        a = self.bn2(self.conv2(h))
        b = shortcut if shortcut is not None else (self.proj_bn(self.proj(x)) if self.project else x)
        if cfg["add"] == "a+b":
            y = a + b
        elif cfg["add"] == "b+a":
            y = b + a
        elif cfg["add"] == "a+=b":
            a += b
            y = a
        else:
            y = torch.add(a, b)
        y = F.relu(y) if cfg["act"] == "relu_fn" else self.act(y)
        if cfg["pool"] == "max":  # ceil_mode: never below 1×1 (no shape test: the model must fx-trace)
            y = F.max_pool2d(y, 2, ceil_mode=True)
        elif cfg["pool"] == "avg":
            y = F.avg_pool2d(y, 2, ceil_mode=True)
        return y


class ResNet(nn.Module):
    def __init__(self, blocks: list[dict[str, Any]], stem_pool: bool) -> None:
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.pool = nn.MaxPool2d(3, 2, 1) if stem_pool else nn.Identity()
        layers, c = [], 8
        for cfg in blocks:
            layers.append(Block(c, cfg))
            c = cfg["width"]
        self.blocks = nn.Sequential(*layers)
        self.fc = nn.Linear(c, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.bn(self.stem(x))))
        return self.fc(self.blocks(x).mean((2, 3)))


def _randomize(model: nn.Module) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2)
            elif isinstance(m, nn.Conv2d) and m.bias is not None:
                m.bias.uniform_(-0.5, 0.5)


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(blocks=st.lists(_block, min_size=1, max_size=3), stem_pool=st.booleans(), seed=st.integers(0, 3))
def test_residual_networks_deploy_exactly_and_are_timed_as_deployed(blocks: list[dict[str, Any]], stem_pool: bool,
                                                                    seed: int) -> None:
    torch.manual_seed(seed)
    model = ResNet(blocks, stem_pool).double().eval()
    _randomize(model)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    deployed = deploy(model, x, channels_last=False)
    with torch.no_grad():
        torch.testing.assert_close(deployed(x), model(x), atol=1e-10, rtol=1e-10)
    fusions = deployed.sparsify_fusions
    # a block whose sum feeds a ReLU(6) has one fused conv (conv2, or the projection when it comes first); the
    # other conv's bias (its own or its folded BN's) moves there when it has one
    for i, (block, cfg) in enumerate(zip(model.blocks, blocks, strict=True)):
        fused = [f for f in fusions if f.add is not None and f.conv.startswith(f"blocks.{i}.")]
        assert len(fused) == (cfg["act"] != "none"), (cfg, fusions)
        if not fused:
            continue
        biased = {"conv2": cfg["bn2"] or cfg["bias2"], "proj": cfg["proj_bn"] or cfg["proj_bias"]}
        convs = ("conv2", "proj") if block.project else ("conv2",)
        conv = fused[0].conv.removeprefix(f"blocks.{i}.")
        assert conv in convs and fused[0].max_value == (6.0 if cfg["act"] == "relu6" else None), (cfg, fused)
        other = next((c for c in convs if c != conv), None)
        assert fused[0].bias_from == (f"blocks.{i}.{other}" if other and biased[other] else None), (cfg, fused)
    lat = LatencyModel(build_channel_graph(model, x), step=4, latency_fn=lambda spec, i, o: 1.0)
    timed = {s.name.removesuffix(".weight"): s for s in lat.layers}
    assert {n for n, s in timed.items() if s.add_relu} == {f.conv for f in fusions if f.add is not None}
    assert {n for n, s in timed.items() if s.bias_merged} == {f.bias_from for f in fusions if f.bias_from}
    for f in fusions:
        assert timed[f.conv].relu_cap == f.max_value
    assert (timed.get("pool") is not None) == stem_pool and (not stem_pool or timed["pool"].follows == "stem.weight")
