"""A latency target met on the GPU by measuring the deployed pruned ResNet-50 (``pytest -m "gpu and slow"``).

Writes what it saw to ``$OUT/latency_target_<model>.json`` when ``OUT`` is set (the report, the latency
model's settings, two further timings of the chosen network for repeatability)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from sparsify import FilterNormConfig, GMPConfig, Sparsifier, SparsifierConfig
from sparsify.deploy import deploy
from sparsify.measure import LatencyModel, benchmark

pytestmark = [pytest.mark.gpu, pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

BATCH, DTYPE = 256, torch.bfloat16


def deployed_ms(model: torch.nn.Module) -> float:
    """p50 ms of ``model`` deployed as a user runs it: BN folded, conv+bias+ReLU fused, bf16 parameters,
    channels_last, batch 256, CUDA graph, L2 flushed."""
    x = torch.randn(BATCH, 3, 224, 224, device="cuda", dtype=DTYPE).contiguous(memory_format=torch.channels_last)
    net = deploy(model.cuda().eval(), x[:2].float(), dtype=DTYPE)  # traced in float32, then cast

    def call() -> None:
        with torch.no_grad():
            net(x)

    return benchmark(call, device="cuda", iters=30, repeats=2).p50


@pytest.mark.parametrize("speedup", [1.5, 2.0])
def test_resnet50_latency_target_on_the_device(speedup: float) -> None:
    from sparsify._compat import import_torchvision

    torch.manual_seed(0)
    model = import_torchvision().models.resnet50().cuda().eval()
    x = torch.randn(2, 3, 224, 224, device="cuda")
    cfg = SparsifierConfig(adapter=FilterNormConfig(), round_to=8, policy=GMPConfig(
        unit="macs", budget="latency", target_speedup=speedup, end_step=1, latency_max_iterations=8))
    sp = Sparsifier(model, x, config=cfg, latency_model=lambda g: LatencyModel(
        g, batch=BATCH, device="cuda", dtype=DTYPE, cast_params=True, step=8, measure=deployed_ms))
    result = sp.prune()
    report = result.latency
    again = [deployed_ms(model) for _ in range(2)]
    out = os.environ.get("OUT")
    if out:
        Path(out, f"latency_target_resnet50_{speedup:g}x.json").write_text(json.dumps({
            "report": report.as_dict(), "latency_model": sp.policy.context.latency_model.describe(),
            "macs_before": result.macs_before, "macs_after": result.macs_after, "again_ms": again,
            "device": torch.cuda.get_device_name(), "torch": torch.__version__}, indent=1, default=str))
    assert report.measured_ms <= report.dense_ms  # never slower than dense
    assert report.met, report.reason
    assert report.speedup >= 0.95 * speedup, report.as_dict()
    assert max(again) / min(again) - 1 <= 0.05  # the chosen network measures the same twice
    assert all(abs(a / report.measured_ms - 1) <= 0.05 for a in again)
