"""benchmarks/speed.py (benchmarks.speed_lib) at tiny CPU settings, and the width-latency tool (sparsify.measure)."""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import time
from pathlib import Path
from types import ModuleType

import pytest
import torch

from sparsify.measure import measure_latency, suggest_round_to, width_latency_table

pytest.importorskip("torch_pruning")

SMOKE = ["--device", "cpu", "--models", "resnet18", "--batch", "2", "--size", "64", "--iters", "3", "--tp-steps", "8",
         "--refine", "2", "--small-batches", "1", "--repeat", "2"]


def _load() -> ModuleType:
    """The benchmark module (imported as the package module ``benchmarks.speed``)."""
    return importlib.import_module("benchmarks.speed")


@pytest.mark.slow
def test_speed_benchmark_smoke(tmp_path: Path) -> None:
    """Every MACs-target arm, one latency target, profiles, two timings and batch 1 on a CPU resnet18."""
    bench = _load()
    out = tmp_path / "speed.json"
    bench.main([*SMOKE, "--profile", "--arms", "ours", "ours+round", "ours+latency", "tp", "tp+round",
                "--latency-targets", "1.5", "--latency-iterations", "2", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["torch"] == torch.__version__ and result["device"]
    assert result["deployment"]["resnet18"]["picked"] == "eager" and out.with_suffix(".md").read_text()
    rows = {r["arm"]: r for r in result["rows"]}
    assert set(rows) == {"dense", "ours", "ours+round", "ours+latency", "tp", "tp+round", "ours@1.5x",
                         "tp+round (MACs of ours@1.5x)"}
    for arm, r in rows.items():
        assert not r["error"], (arm, r["error"])
        assert r["ms"] > 0 and r["realised"] == pytest.approx(r["speedup"] / r["reduction"])
        assert len(r["ms_repeats"]) == 2 and r["realised_spread"] is not None and set(r["small_batch_ms"]) == {"1"}
        assert r["mode"] == "eager" and r["timing"]["method"] == "perf_counter"
    assert rows["ours"]["reduction"] == pytest.approx(2.0, abs=0.1)  # GMP's exact-MACs budget hits the target
    assert rows["ours+round"]["reduction"] >= 1.95 and rows["tp"]["reduction"] >= 1.95
    assert rows["ours+round"]["round_to"] == 8
    odd = {arm: r["info"]["widths_not_multiple_of_8"] for arm, r in rows.items()}
    assert odd["dense"] == 0 and odd["ours+round"] == 0 and odd["ours"] > 0, odd  # round_to=8 aligns every layer
    assert odd["ours+latency"] == 0 and rows["ours+latency"]["reduction"] >= 1.95, rows["ours+latency"]
    assert rows["ours+latency"]["info"]["latency_configs_timed"] > 0
    report = rows["ours@1.5x"]["info"]["latency_target_report"]  # the policy measured pruned copies
    assert report["probes"] and report["target_speedup"] == pytest.approx(1.5)
    for arm, r in rows.items():  # --profile: op time by kind, convolutions the largest part of a resnet18
        kinds = r["info"]["device_ms_by_kind"]
        assert max(kinds, key=kinds.__getitem__) == "conv" and r["info"]["top_kernels"], (arm, kinds)
    for arm in ("dense", "ours+latency"):  # layers alone (latency model) against the same layers in the network
        diag = rows[arm]["info"]["layers_alone_vs_network"]
        assert diag["layers"] >= 20 and diag["layers_not_found"] == 0 and diag["in_network_sum_ms"] > 0, diag
    assert set(rows["ours+latency"]["info"]["layers_alone_vs_network"]["saving"]) == {
        "estimated_ms", "in_network_layers_ms", "measured_network_ms"}


def test_speed_benchmark_time_budget_skips_and_reports(tmp_path: Path) -> None:
    """A run with no time left still times dense (every ratio needs it), skips every arm, says so in the row
    and writes JSON + markdown."""
    bench = _load()
    out = tmp_path / "speed.json"
    bench.main([*SMOKE, "--repeat", "1", "--small-batches", "--time-budget", "0", "--reserve-s", "0",
                "--latency-targets", "2", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert rows[0]["arm"] == "dense" and rows[0]["ms"] > 0 and not rows[0]["error"]
    skipped = [r for r in rows[1:] if r["error"] == "skipped: over the time budget"]
    assert len(skipped) == len(rows) - 1 == 5, [(r["arm"], r["error"]) for r in rows]
    assert "skipped" in out.with_suffix(".md").read_text()


def test_time_budget_finishes_the_arm_under_way_and_skips_the_next(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The budget runs out while the first arm (ours+round) prunes: that arm is timed, every later one skipped."""
    bench = _load()
    from benchmarks.speed_lib import runner

    expired: list[bool] = []

    class Expiring(runner.Clock):
        def left(self) -> float:
            return -1.0 if expired else 1e9

    def prune_then_expire(dense: torch.nn.Module, *_: object) -> tuple[torch.nn.Module, dict]:
        expired.append(True)
        return copy.deepcopy(dense), {}

    monkeypatch.setattr(bench, "Clock", Expiring)
    monkeypatch.setattr(runner, "prune_ours", prune_then_expire)
    out = tmp_path / "speed.json"
    bench.main([*SMOKE, "--repeat", "1", "--small-batches", "--time-budget", "100", "--reserve-s", "0",
                "--latency-targets", "2", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [r["arm"] for r in rows[:2]] == ["dense", "ours+round"] and expired == [True]
    assert all(r["ms"] > 0 and not r["error"] for r in rows[:2]), rows[:2]
    errors = [(r["arm"], r["error"]) for r in rows[2:]]
    assert [e for _, e in errors] == ["skipped: over the time budget"] * 4, errors


def test_a_latency_target_needs_the_time_of_the_longest_one_and_rows_are_saved_as_they_come(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With less time left than the first latency target took, the next is skipped; the JSON holds every row
    finished so far while the run goes on (a command cut short keeps them)."""
    bench = _load()
    from benchmarks.speed_lib import runner

    out, seen = tmp_path / "speed.json", []

    class Shrinking(runner.Clock):
        def left(self) -> float:
            return 0.2 if seen else 1e9  # after the first target: less time than it took

    def slow_target(dense: torch.nn.Module, *_: object, **__: object) -> tuple[torch.nn.Module, dict]:
        seen.append([r["arm"] for r in json.loads(out.read_text())["rows"]])
        time.sleep(0.3)
        return copy.deepcopy(dense), {}

    monkeypatch.setattr(bench, "Clock", Shrinking)
    monkeypatch.setattr(runner, "prune_latency_target", slow_target)
    bench.main([*SMOKE, "--repeat", "1", "--small-batches", "--time-budget", "100", "--reserve-s", "0",
                "--arms", "ours+round", "--latency-targets", "1.5", "2", "--out", str(out)])
    assert seen == [["dense", "ours+round"]]  # saved before the first target ran; the second never started
    rows = {r["arm"]: r for r in json.loads(out.read_text())["rows"]}
    assert not rows["ours@1.5x"]["error"] and rows["ours@2x"]["error"] == "skipped: over the time budget"


def test_h200_preset_sets_the_issue_protocol() -> None:
    """--preset h200: the issue's models, targets and repeatability; later flags override the preset."""
    bench = _load()
    args = bench.parse(["--preset", "h200", "--device", "cuda"])
    assert args.models == ["resnet50", "mobilenet_v2", "vit_b_16"] and args.vit_heads
    assert args.latency_targets == [1.5, 2.0, 3.0] and args.repeat == 2 and args.small_batches == [1, 16]
    assert args.batch == 256 and args.vit_batch == 64 and args.dtype == "bf16" and args.profile
    assert "compile" in args.reference_modes and "compile" not in args.modes and args.time_budget <= 540
    assert bench.parse(["--preset", "h200", "--device", "cuda", "--models", "resnet50"]).models == ["resnet50"]


def test_latency_target_arms_take_their_own_group_cap() -> None:
    """The h200 preset caps the latency arms at 0.8 of every group (half bounded ResNet-50 at 1.72× of a 2×
    target and left 4× fewer MACs out of reach), ViT's MACs-target heads arm at half (random weights otherwise
    keep one head a layer); without the flags every arm shares one cap."""
    from benchmarks.speed_lib.arms import heads_cap, latency_target_cap

    bench = _load()
    preset = bench.parse(["--preset", "h200", "--device", "cuda"])
    assert preset.max_group_sparsity == 0.8 and latency_target_cap(preset) == 0.8 and heads_cap(preset) == 0.5
    assert latency_target_cap(bench.parse(["--device", "cpu", "--max-group-sparsity", "0.6"])) == 0.6
    assert heads_cap(bench.parse(["--device", "cpu", "--max-group-sparsity", "0.6"])) == 0.6
    assert latency_target_cap(bench.parse(["--device", "cpu"])) == 1.0


def test_pick_mode_takes_the_fastest_that_fits() -> None:
    from benchmarks.speed_lib.deployment import pick_mode

    timings = {"eager": {"ms": 10.0, "setup_s": 2.0}, "compile": {"ms": 6.0, "setup_s": 40.0},
               "cuda-graph": {"ms": 8.0, "setup_s": 2.0}, "max-autotune": {"error": "boom"}}
    assert pick_mode(timings, networks=5, seconds_left=1000)[0] == "compile"
    picked, why = pick_mode(timings, networks=5, seconds_left=100)  # 5 × 40 s of compiling does not fit
    assert picked == "cuda-graph" and "compile was fastest" in why
    with pytest.raises(RuntimeError, match="no deployment mode"):
        pick_mode({"eager": {"error": "x"}}, 1, 10)


def test_realised_spread_pairs_repeats_with_dense() -> None:
    from benchmarks.speed_lib.report import Row, fill_ratios, spread

    dense = Row("m", None, "dense", ms=10.0, reduction=1.0, ms_repeats=[10.0, 10.0], small_batch_ms={"1": 2.0})
    row = Row("m", 2.0, "a", ms=5.0, reduction=2.0, ms_repeats=[5.0, 5.5], small_batch_ms={"1": 1.0})
    fill_ratios(row, dense)
    assert row.realised == pytest.approx(1.0) and row.small_batch_speedup == {"1": pytest.approx(2.0)}
    assert row.realised_spread == pytest.approx(spread([1.0, 10 / 5.5 / 2]))
    assert spread([1.0]) is None


def test_layer_times_in_network_times_each_named_module() -> None:
    from benchmarks.speed_lib.diagnostics import alone_vs_network, layer_times_in_network

    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    x = torch.randn(4, 8)
    inside = layer_times_in_network(model, lambda: model(x), ["0.weight", "2.weight", "9.weight"], torch.device("cpu"))
    assert set(inside) == {"0.weight", "2.weight"} and all(v > 0 for v in inside.values())
    diag = alone_vs_network({"0.weight": 1.0, "2.weight": 1.0, "9.weight": 1.0}, inside, network_ms=5.0)
    assert diag["layers"] == 2 and diag["layers_not_found"] == 1 and diag["outside_layers_ms"] < 5.0


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
    from benchmarks.speed_lib.arms import prune_latency
    from benchmarks.speed_lib.models import build, macs
    from sparsify.nn import explicit_multihead_attention_

    dense = build("vit_b_16", 32)
    x = torch.randn(1, 3, 32, 32)
    args = argparse.Namespace(device="cpu", dtype="fp32", latency_points=2, iters=2, warmup=1, p=2)
    model, info = prune_latency(dense, x, 1.5, 8, 2, args, {}, heads=True)
    assert len(info["heads_per_layer"]) == 12 and all(1 <= h <= 12 for h in info["heads_per_layer"])
    swapped = explicit_multihead_attention_(copy.deepcopy(dense))
    assert macs(swapped, x) == pytest.approx(macs(dense, x), rel=1e-9)
    reduction = macs(dense, x) / macs(model, x)
    assert reduction >= 1.5 - 1e-6
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 1000)


def test_depth_takes_over_where_the_widths_miss_a_latency_target(tmp_path: Path) -> None:
    """--depth: a target the width search cannot reach at a tight cap removes residual branches first."""
    bench = _load()
    out = tmp_path / "speed.json"
    bench.main([*SMOKE, "--repeat", "1", "--small-batches", "--no-tp", "--arms", "ours+round", "--latency-targets", "3",
                "--latency-iterations", "2", "--target-max-group-sparsity", "0.3", "--depth", "--out", str(out)])
    row = next(r for r in json.loads(out.read_text())["rows"] if r["arm"] == "ours@3x")
    assert not row["error"], row["error"]
    depth, width_only = row["info"]["depth"], row["info"]["width_only_report"]
    assert not width_only["met"] and depth["branches_found"] == 8 and depth["removed"]
    assert depth["attempts"][-1]["branches"] == len(depth["removed"])
    assert depth["depth_only_ms"][str(len(depth["removed"]))] < width_only["dense_ms"]
    assert row["info"]["latency_target_report"] == depth["attempts"][-1]["latency_target_report"]


@pytest.mark.slow
def test_vit_heads_latency_target_takes_depth_where_heads_and_mlp_miss() -> None:
    """--depth with --vit-heads: a ViT target out of reach of heads+MLP widths at the cap removes encoder
    branches (attention or MLP) of the explicit-attention copy, then prunes heads and MLP of what is left; the
    pruned network is the shallower one and still classifies (a MACs-proportional measure keeps it exact)."""
    from benchmarks.speed_lib.arms import prune_latency_target
    from benchmarks.speed_lib.models import build, macs
    from sparsify.nn import ExplicitMultiheadAttention

    dense = build("vit_b_16", 32)
    x = torch.randn(1, 3, 32, 32)
    args = argparse.Namespace(device="cpu", dtype="fp32", latency_points=2, iters=2, warmup=1, p=2,
                              latency_tolerance=0.03, latency_iterations=2, target_max_group_sparsity=0.3, depth=True)

    measured: list[torch.nn.Module] = []

    def measure(model: torch.nn.Module) -> float:  # deterministic "ms": MACs, the explicit attention 20 % faster
        measured.append(model)
        swapped = any(isinstance(m, ExplicitMultiheadAttention) for m in model.modules())
        return macs(model, x) / 1e6 * (0.8 if swapped else 1.0)

    model, info = prune_latency_target(dense, x, 3.0, 8, 2, args, {}, measure, heads=True)
    assert measured and all(m is not dense for m in measured)  # a deploying measure moves what it gets (to a GPU)
    assert info["latency_target_report"]["target_ms"] == pytest.approx(measure(dense) / 3.0)  # the user's dense
    assert not info["width_only_report"]["met"] and info["depth"]["removed"]
    assert info["depth"]["branches_found"] == 24
    heads = [m.num_heads for m in model.modules() if isinstance(m, ExplicitMultiheadAttention)]
    assert heads == info["heads_per_layer"] and 1 <= len(heads) <= 12 and all(1 <= h <= 12 for h in heads)
    assert measure(dense) / measure(model) >= 3.0 * (1 - 0.03 - 1e-6)
    assert measure(dense) / measure(model) <= 3.0 / 0.8  # not the swap's 1.25x on top of the target
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 1000)


def test_small_batches_are_timed_with_cudnn_heuristics_unless_asked(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The main batch keeps the process's cuDNN autotuner; --small-batches are timed with it off (its pick at
    batch 1 was slower and changed between processes on the H200), on again with --small-batch-autotune."""
    from benchmarks.speed_lib import deployment

    seen: list[tuple[int, bool]] = []
    original = deployment.Deployed.time

    def recording(self: deployment.Deployed, batch: int) -> dict:
        seen.append((batch, torch.backends.cudnn.benchmark))
        return original(self, batch)

    monkeypatch.setattr(deployment.Deployed, "time", recording)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    bench = _load()
    common = [*SMOKE, "--no-tp", "--arms", "ours+round", "--no-latency-targets", "--repeat", "1"]
    bench.main([*common, "--out", str(tmp_path / "a.json")])
    assert {b for b, on in seen if on} == {2} and {b for b, on in seen if not on} == {1}
    seen.clear()
    bench.main([*common, "--small-batch-autotune", "--out", str(tmp_path / "b.json")])
    assert seen and all(on for _, on in seen)
    assert torch.backends.cudnn.benchmark is True


def test_torch_pruning_is_timed_at_the_macs_each_latency_target_cost(tmp_path: Path) -> None:
    """After ours@t×, tp+round prunes to the MACs reduction that arm reached, so the two compare at equal MACs."""
    bench = _load()
    out = tmp_path / "speed.json"
    bench.main([*SMOKE, "--repeat", "1", "--small-batches", "--arms", "ours+round", "tp+round", "--latency-targets",
                "1.5", "--latency-iterations", "2", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    ours = next(r for r in rows if r["arm"] == "ours@1.5x")
    peer = next(r for r in rows if r["arm"] == "tp+round (MACs of ours@1.5x)")
    assert not ours["error"] and not peer["error"], (ours["error"], peer["error"])
    assert peer["info"]["macs_target"] == pytest.approx(ours["reduction"], rel=1e-3)
    assert peer["reduction"] >= ours["reduction"] * (1 - 1e-3) and peer["round_to"] == ours["round_to"]


def test_small_batch_guard_keeps_the_network_that_meets_the_target_and_is_nowhere_slower() -> None:
    from benchmarks.speed_lib.report import Row
    from benchmarks.speed_lib.runner import choose_guarded, slower_at_small_batches

    def row(speedup: float, b1: float, round_to: int) -> Row:
        return Row("m", None, "ours@2x", round_to, speedup=speedup, small_batch_speedup={"1": b1, "16": 1.2})

    first, retry = row(2.0, 0.86, 8), row(1.98, 1.03, 16)
    assert slower_at_small_batches(first) and not slower_at_small_batches(retry)
    chosen = choose_guarded(first, retry, 2.0, 0.03)
    assert chosen is retry and first.arm == "ours@2x (not chosen)" and retry.arm == "ours@2x"
    assert chosen.info["small_batch_guard"]["chosen_round_to"] == 16
    # a retry that misses the target is not taken, however fast at batch 1
    first, retry = row(2.0, 0.86, 8), row(1.80, 1.30, 16)
    assert choose_guarded(first, retry, 2.0, 0.03) is first and retry.arm.endswith("(not chosen)")
    # both meet it and both are slower somewhere: the better worst case
    first, retry = row(2.0, 0.86, 8), row(2.0, 0.95, 16)
    assert choose_guarded(first, retry, 2.0, 0.03) is retry
