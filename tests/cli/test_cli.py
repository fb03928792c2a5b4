"""The ``sparsify`` command line: ``inspect`` arguments and model specs, the demo's data-path errors and timer."""

from __future__ import annotations

import gzip
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from sparsify.cli import main, parser
from sparsify.cli.demo import train as demo_train
from sparsify.cli.demo.data import load_data, load_fashion_mnist


def test_inspect_without_model_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["inspect"])
    assert exc.value.code == 2  # argparse's usage error, not a silent default model
    assert "the following arguments are required: model" in capsys.readouterr().err


def test_inspect_help_documents_the_model_specs() -> None:
    sub = next(a for a in parser()._actions if a.dest == "command")
    text = sub.choices["inspect"].format_help()
    assert "hf:<model_type>" in text and "package.module:function" in text


def test_inspect_builtin_model(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", "residual_cnn", "--prunable-only"]) == 0
    out = capsys.readouterr().out
    assert "Channel groups of" in out and "prunable" in out


def test_inspect_unknown_model_names_the_specs() -> None:
    with pytest.raises(SystemExit, match=r"hf:<model_type>.*package\.module:function"):
        main(["inspect", "no_such_model_xyz"])


def test_inspect_hf_model_type(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("transformers")
    from sparsify.cli.inspect import load_model

    model, example = load_model("hf:llama")
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 64
    assert set(example) == {"input_ids"} and example["input_ids"].shape == (1, 8)
    assert main(["inspect", "hf:llama", "--input-shape", "2,5", "--prunable-only"]) == 0
    out = capsys.readouterr().out
    assert "Channel groups of LlamaForCausalLM" in out
    assert "5 prunable (4 exact, 1 inexact)" in out  # 2 MLP groups, 2 KV-head groups, the hidden size


def test_inspect_hf_unknown_model_type() -> None:
    pytest.importorskip("transformers")
    with pytest.raises(SystemExit, match="'no_such_type' is not a transformers model type"):
        main(["inspect", "hf:no_such_type"])


@pytest.mark.parametrize("data", ["cifar10", "fashion-mnist"])
def test_demo_data_without_path_says_which_flag(data: str, tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match=f"--data {data} needs --data-path"):
        main(["demo", "--quick", "--data", data, "--out", tmp_path / "out"])
    with pytest.raises(SystemExit, match="--data-path"):
        load_data(data, tmp_path / "missing")
    assert not (tmp_path / "out" / "demo.json").exists()


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_reads_idx_files_from_data_path(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("t10k", 6)):
        _write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    data = load_fashion_mnist(tmp_path)
    assert data.x_train.shape == (12, 1, 28, 28) and data.x_test.shape == (6, 1, 28, 28)
    assert data.y_test.tolist() == [0, 1, 2, 3, 4, 5] and len(data.classes) == 10
    assert abs(float(data.x_train.mean())) < 1e-5  # standardised with the training statistics
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(SystemExit, match=r"t10k-labels-idx1-ubyte.*--data-path"):
        load_fashion_mnist(tmp_path)


def test_demo_latency_is_the_median_of_measure_latency(monkeypatch: pytest.MonkeyPatch) -> None:
    times = iter([5.0, 1.0, 3.0, 2.0, 4.0, 9.0])  # rounds alternate the two models: a gets 5, 3, 4; b 1, 2, 9
    calls: list[dict[str, object]] = []

    def fake(fn: Callable[[], object], **kwargs: int) -> list[float]:
        calls.append(kwargs)
        fn()
        return [next(times)]

    monkeypatch.setattr(demo_train, "measure_latency", fake)
    a, b = torch.nn.Linear(3, 2).train(), torch.nn.Linear(3, 2).eval()
    assert demo_train.latencies_ms([a, b], torch.randn(4, 3), repeats=3) == [4.0, 2.0]
    assert len(calls) == 6 and all(c == {"iters": 1, "warmup": 0} for c in calls)
    assert a.training and not b.training  # modes restored
