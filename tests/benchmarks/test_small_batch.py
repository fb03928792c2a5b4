"""benchmarks/small_batch.py on the CPU: dense and a rounded pruned network timed per batch, kernels compared."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from benchmarks import small_batch


def test_small_batch_profile_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "small_batch.json"
    before = torch.backends.cudnn.benchmark
    small_batch.main(["--device", "cpu", "--models", "resnet18", "--size", "32", "--batches", "1", "2",
                      "--profile-batches", "1", "--iters", "2", "--round-to-list", "8", "--no-cudnn-benchmark",
                      "--out", str(out)])
    assert torch.backends.cudnn.benchmark == before  # the process's flag is left as it was
    nets = json.loads(out.read_text())["models"]["resnet18"]
    assert set(nets) == {"dense", "round8"} and nets["round8"]["unaligned_8"] == 0
    assert all(set(n["ms"]) == {"1", "2"} and all(v > 0 for v in n["ms"].values()) for n in nets.values())
    assert nets["dense"]["kernels"]["1"] > 0 and nets["round8"]["grown"]["1"]  # ops compared at batch 1
