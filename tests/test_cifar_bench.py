"""The CIFAR-10 benchmark harness runs end to end at tiny settings on the CPU (every arm)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = [ROOT / "data" / "cifar10_jpeg.npz", ROOT.parent / "shared" / "data" / "cifar10_jpeg.npz"]


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    data = next((p for p in DATA if p.exists()), None)
    if data is None:
        pytest.skip("cifar10_jpeg.npz not found (../shared/data)")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import cifar as bench

    return bench, data, tmp_path_factory.mktemp("cifar")


@pytest.mark.parametrize("arm", ["dense", "str_bn", "gmp_erk", "slimming", "l1", "torch_pruning"])
def test_arm_runs_and_hits_its_macs_target(cifar, arm: str) -> None:
    bench, data, out = cifar
    args = argparse.Namespace(arm=arm, ratio=2.0, model="resnet20", epochs=2, prune_epoch=1, batch=64, lr=0.05,
                              seed=0, data=str(data), cache=str(out / "cache"), limit=128, device="cpu",
                              eval_every=1, no_graphs=True, fp32=True, sync_bn=False, out=str(out))
    record = bench.run(args)
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
    args = argparse.Namespace(arm=arm, ratio=2.0, model="vgg19", epochs=2, prune_epoch=1, batch=32, lr=0.05,
                              seed=0, data=str(data), cache=str(out / "cache"), limit=64, device="cpu",
                              eval_every=1, no_graphs=True, fp32=True, sync_bn=False, out=str(out / "vgg"))
    record = bench.run(args)
    assert record["model"] == "vgg19" and record["macs_after"] < record["macs_before"]


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
           str(ROOT / "benchmarks" / "cifar.py"), "--arm", "str_bn", "--device", "cpu", "--model", "resnet20",
           "--limit", "128", "--batch", "64",
           "--epochs", "2", "--prune-epoch", "1", "--no-graphs", "--fp32", "--data", str(data),
           "--cache", str(out / "cache"), "--out", str(tmp_path), "--eval-every", "1"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads((tmp_path / "resnet20_str_bn_2x_seed0_ddp2.json").read_text())
    assert record["processes"] == 2
    assert record["synchronized"]["world_size"] == 2 and record["synchronized"]["tensors"] > 0
