"""The files in examples run, at small settings."""

from __future__ import annotations

import importlib.util
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_prune_resnet_l1(tv) -> None:
    result = _load("prune_resnet_l1").main(fraction=0.5, size=64)
    assert result["params_after"] < 0.4 * result["params_before"]


def test_custom_op_rule() -> None:
    assert _load("custom_op_rule").main() < 1e-10
