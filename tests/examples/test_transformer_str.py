"""examples/transformer_str.py runs at tiny settings: STR on a byte-level LLaMA, prune, save, reload."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

pytest.importorskip("transformers")

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "transformer_str.py"
TINY = {"dense_steps": 30, "sparse_steps": 20, "finetune_steps": 5, "hidden": 32, "layers": 2, "seq": 32,
        "batch": 8, "lr": 1e-2, "latency_repeats": 2, "sample_tokens": 12}


def _main():
    spec = importlib.util.spec_from_file_location("transformer_str", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.mark.parametrize(("adapter", "policy"), [
    ("filter_norm", "str"), pytest.param("heads", "gmp", marks=pytest.mark.slow)])
def test_transformer_str_example(adapter: str, policy: str, tmp_path: Path) -> None:
    stats = _main()(adapter=adapter, policy=policy, s_init=-1.0, threshold_decay=0.1, threshold_lr=0.05,
                    out_dir=str(tmp_path), **TINY)
    assert stats["dense"]["val_loss"] < math.log(256) - 0.5  # it learned something about bytes
    assert stats["pruned"]["params"] < stats["dense"]["params"]
    assert 0 < stats["channel_sparsity"] < 1
    assert abs(stats["pruned"]["val_loss"] - stats["soft_val_loss"]) <= 1e-5  # pruning is exact
    assert stats["reload_identical"]
    assert (tmp_path / "pruned-llama" / "config.json").is_file()
    widths = stats["widths"]
    saved = stats["saved_config"]
    assert saved["hidden_size"] == 32 and saved["head_dim"] == 8
    if adapter == "heads":
        assert any(w["num_key_value_heads"] < 2 for w in widths)
        assert all(w["num_attention_heads"] == 2 * w["num_key_value_heads"] for w in widths)
    else:
        assert any(w["intermediate_size"] < 96 for w in widths)
    uniform = len({tuple(sorted(w.items())) for w in widths}) == 1
    assert (stats["layer_record"] is None) == uniform
    assert stats["finetuned"]["sample"].startswith("The ")
