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
