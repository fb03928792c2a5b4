"""benchmarks/speed.py at tiny CPU settings, and the width-latency tool (sparsify.measure)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest
import torch

from sparsify.measure import measure_latency, suggest_round_to, width_latency_table

pytest.importorskip("torch_pruning")


def _load() -> ModuleType:
    """The benchmark module (imported as the package module ``benchmarks.speed``)."""
    return importlib.import_module("benchmarks.speed")


def test_speed_benchmark_smoke(tmp_path: Path) -> None:
    bench = _load()
    out = tmp_path / "speed.json"
    bench.main(["--device", "cpu", "--models", "resnet18", "--batch", "2", "--size", "64", "--iters", "3",
                "--tp-steps", "8", "--refine", "2", "--profile", "--cast-params", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["torch"] == torch.__version__ and result["device"]
    rows = {r["arm"]: r for r in result["rows"]}
    assert set(rows) == {"dense", "ours", "ours+round", "ours+latency", "tp", "tp+round"}
    for arm, r in rows.items():
        assert not r["error"], (arm, r["error"])
        assert r["ms"] > 0 and r["realised"] == pytest.approx(r["speedup"] / r["reduction"])
    assert rows["ours"]["reduction"] == pytest.approx(2.0, abs=0.1)  # GMP's exact-MACs budget hits the target
    assert rows["ours+round"]["reduction"] >= 1.95 and rows["tp"]["reduction"] >= 1.95
    assert rows["ours+round"]["round_to"] == 8
    odd = {arm: r["info"]["widths_not_multiple_of_8"] for arm, r in rows.items()}
    assert odd["dense"] == 0 and odd["ours+round"] == 0 and odd["ours"] > 0, odd  # round_to=8 aligns every layer
    assert odd["ours+latency"] == 0 and rows["ours+latency"]["reduction"] >= 1.95, rows["ours+latency"]
    assert rows["ours+latency"]["info"]["latency_configs_timed"] > 0
    for arm, r in rows.items():  # --profile: op time by kind, convolutions the largest part of a resnet18
        kinds = r["info"]["device_ms_by_kind"]
        assert max(kinds, key=kinds.__getitem__) == "conv" and r["info"]["top_kernels"], (arm, kinds)


def test_suggest_round_to_prefers_multiples_that_pay_off() -> None:
    # widths that are not multiples of 8 run 3× slower: rounding up to 8 pays off, 16 costs more channels
    ms = {w: (1.0 if w % 8 == 0 else 3.0) * w / 64 for w in range(64, 257, 2)}
    best, scores = suggest_round_to(ms, (8, 16))
    assert best == 8 and scores[8] < scores[1] and scores[8] < scores[16]
    linear = {w: w / 64 for w in range(64, 257, 2)}  # latency ∝ width: no rounding pays off
    assert suggest_round_to(linear, (8, 16))[0] == 1
    with pytest.raises(ValueError, match="rounded-up width"):
        suggest_round_to({63: 1.0}, (8,))


def test_width_latency_table_on_cpu() -> None:
    table = width_latency_table("linear", range(8, 33, 4), batch=2, tokens=4, device="cpu", iters=2, warmup=1,
                                candidates=(8, 16))
    assert set(table.ms) == set(range(8, 33, 4)) and table.suggested in (1, 8, 16)
    assert json.dumps(table.to_dict())
    with pytest.raises(ValueError, match="op must be"):
        width_latency_table("conv5x5", [8], device="cpu")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="iters"):
        measure_latency(lambda: None, iters=0)


@pytest.mark.slow
def test_vit_heads_arm_prunes_heads_and_counts_their_attention_macs() -> None:
    """--vit-heads: after the swap, whole heads are prunable under the latency budget, and the MACs of a
    pruned swapped model count its narrower attention products (the swapped dense model = the original)."""
    bench = _load()
    dense = bench.build("vit_b_16", 32)
    x = torch.randn(1, 3, 32, 32)
    args = bench.argparse.Namespace(device="cpu", dtype="fp32", latency_points=2, iters=2, warmup=1, p=2)
    model, info = bench.prune_latency(dense, x, 1.5, 8, 2, args, {}, heads=True)
    assert len(info["heads_per_layer"]) == 12 and all(1 <= h <= 12 for h in info["heads_per_layer"])
    swapped = bench.explicit_multihead_attention_(bench.copy.deepcopy(dense))
    assert bench.macs(swapped, x) == pytest.approx(bench.macs(dense, x), rel=1e-9)
    reduction = bench.macs(dense, x) / bench.macs(model, x)
    assert reduction >= 1.5 - 1e-6
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 1000)
