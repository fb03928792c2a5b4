"""The CIFAR-10 benchmark harness runs end to end at tiny settings on the CPU (every arm)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DATA = [Path(p) for p in [os.environ.get("SPARSIFY_CIFAR10", "")] if p] + [ROOT / "data" / "cifar10_jpeg.npz"]


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    data = next((p for p in DATA if p.exists()), None)
    if data is None:
        pytest.skip("cifar10_jpeg.npz not found: set SPARSIFY_CIFAR10=/path/to/it or put it in data/")
    from benchmarks import cifar as bench

    return bench, data, tmp_path_factory.mktemp("cifar")


def _args(bench, data: Path, out: Path, **changes: object) -> argparse.Namespace:
    """The command line of a tiny CPU run (2 epochs of 128 images, prune after 1)."""
    settings = {"arm": "dense", "ratio": 2.0, "model": "resnet20", "epochs": 2, "prune_epoch": 1, "batch": 64,
                "lr": 0.05, "seed": 0, "data": data, "cache": out / "cache", "limit": 128, "device": "cpu",
                "eval_every": 1, "out": out, **changes}
    argv = [a for k, v in settings.items() for a in (f"--{k.replace('_', '-')}", str(v))]
    return bench.parser().parse_args([*argv, "--no-graphs", "--fp32"])


@pytest.mark.parametrize("arm", ["dense", "str_bn", "gmp_erk", "slimming", "l1", "torch_pruning"])
def test_arm_runs_and_hits_its_macs_target(cifar, arm: str) -> None:
    bench, data, out = cifar
    record = bench.run(_args(bench, data, out, arm=arm))
    assert 0.0 <= record["top1"] <= 1.0 and len(record["epochs"]) == 2
    reduction = record["macs_before"] / record["macs_after"]
    if arm == "dense":
        assert reduction == 1.0
    elif arm != "str_bn":  # STR's controller needs more steps than 2 tiny epochs to reach the target
        assert 1.95 <= reduction <= 2.1, reduction
    saved = json.loads((out / f"resnet20_{arm}_{record['ratio']:g}x_seed0.json").read_text())
    assert saved["top1"] == record["top1"]


@pytest.mark.parametrize("arm", ["str_bn", "torch_pruning"])
def test_vgg19_runs(cifar, arm: str) -> None:
    """The second model of the benchmark (a plain chain: no residuals) runs in the same harness."""
    bench, data, out = cifar
    record = bench.run(_args(bench, data, out / "vgg", arm=arm, model="vgg19", batch=32, limit=64))
    assert record["model"] == "vgg19" and record["macs_after"] < record["macs_before"]


@pytest.mark.parametrize("arm", ["str_bn", "torch_pruning"])
def test_a_run_stopped_before_the_prune_epoch_resumes_to_the_same_result(cifar, arm: str) -> None:
    """--stop-after-s: a checkpoint at an epoch's end before pruning; the same command then finishes the run
    exactly as one uninterrupted run does (same losses, same accuracy, same pruned size)."""
    bench, data, out = cifar
    out = out / f"resume_{arm}"
    common = {"arm": arm, "epochs": 3, "prune_epoch": 2, "limit": 96, "batch": 32}
    whole = bench.run(_args(bench, data, out / "whole", **common))
    split = _args(bench, data, out / "split", **common, stop_after_s=0)
    assert bench.run(split) == {}  # stopped after the first epoch
    assert list((out / "split").glob("*.ckpt.pt"))
    resumed = bench.run(split)
    assert [e["loss"] for e in resumed["epochs"]] == [e["loss"] for e in whole["epochs"]]
    assert resumed["top1"] == whole["top1"] and resumed["macs_after"] == whole["macs_after"]
    assert not list((out / "split").glob("*.ckpt.pt"))
    other = _args(bench, data, out / "split", **{**common, "seed": 1}, stop_after_s=0)
    assert bench.run(other) == {}
    with pytest.raises(SystemExit, match="other settings"):
        bench.run(_args(bench, data, out / "split", **{**common, "seed": 1, "lr": 0.01}))


def test_a_dense_run_checkpoints_at_any_epoch(cifar) -> None:
    """The dense arm never prunes: --stop-after-s stops it after any epoch, also past --prune-epoch (a long
    dense pretraining under a per-command time limit)."""
    bench, data, out = cifar
    args = _args(bench, data, out / "resume_dense", epochs=2, prune_epoch=1, limit=96, batch=32, stop_after_s=0)
    assert bench.run(args) == {}
    assert bench.run(args)["top1"] >= 0.0 and not list((out / "resume_dense").glob("*.ckpt.pt"))


def test_report_prints_table_and_plot(cifar, capsys) -> None:
    bench, _, out = cifar
    if not list(out.glob("*.json")):
        pytest.skip("no runs in this worker")
    bench.report(out)
    assert (out / "accuracy_vs_macs.png").exists()
    assert "CIFAR-10" in capsys.readouterr().out


def test_ddp_run_on_two_cpu_processes(cifar, tmp_path: Path) -> None:
    """torchrun with 2 gloo processes: each rank takes half of the global batch; before pruning the
    ranks' thresholds are checked identical (the run fails otherwise); rank 0 writes the record."""
    import os
    import subprocess

    _, data, out = cifar
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "-m", "benchmarks.cifar", "--arm", "str_bn", "--device", "cpu", "--model", "resnet20",
           "--limit", "128", "--batch", "64",
           "--epochs", "2", "--prune-epoch", "1", "--no-graphs", "--fp32", "--data", str(data),
           "--cache", str(out / "cache"), "--out", str(tmp_path), "--eval-every", "1"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads((tmp_path / "resnet20_str_bn_2x_seed0_ddp2.json").read_text())
    assert record["processes"] == 2
    assert record["synchronized"]["world_size"] == 2 and record["synchronized"]["tensors"] > 0


# --- the protocol mode (issue #18): every arm from one dense checkpoint, S sparsify + F fine-tune epochs ---

PROTOCOL_FAST = ["dense_ft", "str_bn", "gmp_erk_bn", "l1_oneshot"]
PROTOCOL_SLOW = ["str_filter", "gmp_uniform_bn", "gmp_global_bn", "gmp_uniform_filter", "gmp_global_filter",
                 "gmp_erk_filter", "slimming", "torch_pruning"]


@pytest.fixture(scope="module")
def dense_init(cifar):
    """A dense resnet20 trained 1 epoch on 256 images, saved with --save-model: the protocol's start."""
    bench, data, out = cifar
    args = _args(bench, data, out / "dense", epochs=1, limit=256)
    args.save_model = True
    record = bench.run(args)
    return out / "dense" / "resnet20_dense_1x_seed0.model.pt", record


def _protocol(bench, data: Path, out: Path, init: Path, **changes: object) -> argparse.Namespace:
    """1 sparsify + 1 fine-tune epoch of 256 images from ``init``, 2.13× target."""
    settings = {"arm": "dense_ft", "ratio": 2.13, "model": "resnet20", "init": init, "sparsify_epochs": 1,
                "finetune_epochs": 1, "batch": 64, "seed": 0, "data": data, "cache": out / "cache", "limit": 256,
                "device": "cpu", "eval_every": 1, "out": out / "protocol", **changes}
    argv = [a for k, v in settings.items() for a in (f"--{k.replace('_', '-')}", str(v))]
    return bench.parser().parse_args([*argv, "--no-graphs", "--fp32"])


def _check_protocol_run(bench, record: dict, dense: dict, arm: str) -> None:
    assert record["top1_init"] == dense["top1"]  # the run started from the saved dense weights
    assert record["recipe"]["epochs"] == 2 and record["recipe"]["lr"] == 0.01 and len(record["epochs"]) == 2
    assert record["recipe"]["warmup_epochs"] == 0
    reduction = record["macs_before"] / record["macs_after"]
    widths, dense_widths = record["widths"], record["dense_widths"]
    assert widths.keys() == dense_widths.keys() and len(widths) > 10  # every conv, kept for the widths plot
    if arm == "dense_ft":
        assert reduction == 1.0 and record["target_met"] is None and record["prune_epoch"] is None
        assert widths == dense_widths
        return
    assert sum(widths.values()) < sum(dense_widths.values())
    assert record["target_met"] is True, reduction
    assert abs(reduction / 2.13 - 1) <= bench.TARGET_TOLERANCE
    assert record["images_per_s_finetune"] > 0
    if arm == "l1_oneshot":  # pruned before the first epoch: no sparsify phase, every epoch trains the pruned net
        assert record["prune_epoch"] == 0 and record["images_per_s_sparsify"] is None
    else:
        assert record["prune_epoch"] == 1 and record["images_per_s_sparsify"] > 0


@pytest.mark.parametrize("arm", [*PROTOCOL_FAST, *(pytest.param(a, marks=pytest.mark.slow) for a in PROTOCOL_SLOW)])
def test_protocol_arm_starts_from_the_dense_model_and_hits_its_target(cifar, dense_init, arm: str) -> None:
    bench, data, out = cifar
    init, dense = dense_init
    record = bench.run(_protocol(bench, data, out, init, arm=arm))
    _check_protocol_run(bench, record, dense, arm)


@pytest.mark.slow
@pytest.mark.parametrize("importance", ["taylor", "lamp", "group_sl"])
def test_protocol_torch_pruning_importances(cifar, dense_init, importance: str) -> None:
    bench, data, out = cifar
    init, dense = dense_init
    record = bench.run(_protocol(bench, data, out, init, arm="torch_pruning", tp_importance=importance))
    _check_protocol_run(bench, record, dense, "torch_pruning")
    assert record["info"]["tp_importance"] == importance and record["label"] == f"torch_pruning ({importance})"


@pytest.mark.slow
@pytest.mark.parametrize("arm", ["str_bn", "str_filter"])
def test_protocol_round_to_gives_widths_multiple_of_8(cifar, dense_init, arm: str) -> None:
    import torch

    bench, data, out = cifar
    init, _ = dense_init
    args = _protocol(bench, data, out / "round", init, arm=arm, round_to=8)
    args.save_model = True
    record = bench.run(args)
    assert record["round_to"] == 8 and record["macs_after"] < record["macs_before"]
    state = torch.load(out / "round" / "protocol" / f"resnet20_{arm}_2.13x_seed0_round8.model.pt")
    widths = {k: v.shape[0] for k, v in state.items() if k.endswith("weight") and v.ndim == 4}
    assert all(w % 8 == 0 for w in widths.values()), widths
    assert record["target_met"] == bench.target_met(record["macs_reduction"], 2.13)


def test_protocol_refuses_a_checkpoint_of_another_model(cifar, dense_init) -> None:
    bench, data, out = cifar
    init, _ = dense_init
    with pytest.raises(SystemExit, match="not a dense state_dict of --model resnet32"):
        bench.run(_protocol(bench, data, out, init, model="resnet32"))
    with pytest.raises(SystemExit, match="no such file"):
        bench.run(_protocol(bench, data, out, out / "missing.pt"))


def test_protocol_options_come_together(cifar) -> None:
    bench, data, out = cifar
    args = _args(bench, data, out, sparsify_epochs=1)
    with pytest.raises(SystemExit, match="needs all of --init"):
        bench.schedule(args)
    assert bench.schedule(_args(bench, data, out)).lr == 0.05  # from scratch: the given lr, 1-epoch warm-up


def _record(arm: str, seed: int, top1: float, ratio: float = 1.0, **extra: object) -> dict:
    return {"arm": arm, "label": arm, "ratio": ratio, "model": "resnet56", "seed": seed, "top1": top1,
            "recipe": {"epochs": 100, "prune_epoch": 30}, "init": "dense.pt", "macs_before": 126e6,
            "macs_after": 126e6 / ratio, "params_after": 400e3, "train_seconds": 1.0, "images_per_s": 1e4,
            "images_per_s_sparsify": 9e3, "images_per_s_finetune": 1.5e4, "device": "CPU", "torch": "x",
            "command": f"cifar --arm {arm}", "target_met": None if arm == "dense_ft" else True,
            "epochs": [{"epoch": 1}], **extra}


def test_report_groups_seeds_and_measures_delta_at_the_same_seeds(tmp_path: Path) -> None:
    """Mean ± std over seeds; Δ to dense_ft over the seeds both arms ran (seed 2 of str_bn has no baseline);
    a missed target shows in the table; the results JSON has no per-epoch logs."""
    from benchmarks.cifar_lib.report import report

    records = [_record("dense_ft", 0, 0.90), _record("dense_ft", 1, 0.92), _record("dense", 0, 0.80),
               _record("str_bn", 0, 0.89, 2.13), _record("str_bn", 1, 0.90, 2.13),
               _record("str_bn", 2, 0.99, 2.13), _record("gmp_erk_bn", 0, 0.85, 2.13, target_met=False)]
    for i, r in enumerate(records):
        (tmp_path / f"run{i}.json").write_text(json.dumps(r))
    rows = {r["label"]: r for r in report(tmp_path, tmp_path / "results" / "protocol.json")}
    assert rows["str_bn"]["seeds"] == [0, 1, 2] and rows["str_bn"]["top1_mean"] == pytest.approx(0.9266667)
    assert rows["str_bn"]["delta_top1"] == pytest.approx(((0.89 - 0.90) + (0.90 - 0.92)) / 2)
    assert rows["str_bn"]["baseline"] == "dense_ft" and rows["dense_ft"]["delta_top1"] is None
    assert rows["dense"]["delta_top1"] == pytest.approx(-0.10)  # dense_ft is the baseline where both ran
    assert rows["gmp_erk_bn"]["target_met"] is False and rows["dense_ft"]["target_met"] is None
    table = (tmp_path / "table.md").read_text()
    assert "| resnet56 | str_bn | 2.13× | 2.13 |" in table and "92.67 ± 5.51 (3) | -1.50 (dense_ft)" in table
    assert "**no**" in table
    saved = json.loads((tmp_path / "results" / "protocol.json").read_text())
    assert len(saved["rows"]) == 4 and all("epochs" not in row for row in saved["rows"])
    assert (tmp_path / "accuracy_vs_macs.png").exists() and not (tmp_path / "accuracy_vs_latency.png").exists()
    assert not (tmp_path / "widths.png").exists()  # no run recorded its widths


def test_report_plots_the_widths_of_pruned_runs(tmp_path: Path) -> None:
    from benchmarks.cifar_lib.report import report

    dense = {"conv1": 16, "layers.0.conv1": 16, "layers.0.conv2": 16}
    runs = [_record("dense_ft", 0, 0.90), _record("str_bn", 0, 0.89, 2.13), _record("l1_oneshot", 0, 0.88, 2.13)]
    runs[1].update(dense_widths=dense, widths={"conv1": 12, "layers.0.conv1": 5, "layers.0.conv2": 12})
    runs[2].update(dense_widths=dense, widths={"conv1": 10, "layers.0.conv1": 8, "layers.0.conv2": 10})
    for i, r in enumerate(runs):
        (tmp_path / f"run{i}.json").write_text(json.dumps(r))
    report(tmp_path)
    assert (tmp_path / "widths.png").stat().st_size > 1000


def test_parallel_passes_the_protocol_options_on(cifar, dense_init) -> None:
    from benchmarks.cifar_lib.launch import commands

    bench, data, out = cifar
    init, _ = dense_init
    args = _protocol(bench, data, out, init, tp_importance="taylor", round_to=8)
    (spec, cmd), = commands(args, ["str_bn:4"])
    line = " ".join(cmd)
    assert spec == "str_bn:4" and "--arm str_bn --ratio 4" in line
    for option in (f"--init {init}", "--sparsify-epochs 1", "--finetune-epochs 1", "--tp-importance taylor",
                   "--round-to 8", "--no-graphs", "--fp32"):
        assert option in line
    assert bench.parser().parse_args(cmd[3:]).init == str(init)  # the child parses what it is given


@pytest.mark.slow
def test_parallel_runs_the_arms_at_most_max_procs_at_once(cifar, dense_init) -> None:
    from benchmarks.cifar_lib.launch import parallel

    bench, data, out = cifar
    init, _ = dense_init
    args = _protocol(bench, data, out / "parallel", init, max_procs=1)
    Path(args.out).mkdir(parents=True)
    assert parallel(args, ["dense_ft", "l1_oneshot:2.13"]) == {"dense_ft": 0, "l1_oneshot:2.13": 0}
    assert {p.name for p in Path(args.out).glob("*.json")} == {"resnet20_dense_ft_1x_seed0.json",
                                                         "resnet20_l1_oneshot_2.13x_seed0.json"}


def test_deployed_latency_is_measured_on_the_plain_network() -> None:
    import torch

    from benchmarks.cifar_lib.latency import deployed_latency_ms
    from benchmarks.cifar_lib.models import build

    model = build("resnet20").eval()
    ms = deployed_latency_ms(model, torch.randn(3, 3, 32, 32), batch=4, iters=2, warmup=1)
    assert ms > 0
