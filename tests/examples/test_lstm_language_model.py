"""examples/lstm_language_model.py runs at small settings."""

from __future__ import annotations

import importlib.util
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "lstm_language_model.py"


def test_lstm_language_model_example() -> None:
    spec = importlib.util.spec_from_file_location("lstm_language_model", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    r = module.main(hidden=32, layers=2, embed=16, steps=20, finetune_steps=5, sparsity=0.5, seq_len=32, batch=8,
                    eval_chars=2000)
    assert r["hidden_pruned"] == 16 and r["params_pruned"] < 0.5 * r["params_dense"]
    assert r["max_abs_diff"] < 1e-4  # the pruned model computes what the masked one did (float32)
    assert abs(r["bpc_pruned"] - r["bpc_soft"]) < 1e-4
    assert r["bpc_dense"] < 6.0 and r["bpc_finetuned"] < 6.0  # it learns something (uniform: log2(103) ≈ 6.7)
