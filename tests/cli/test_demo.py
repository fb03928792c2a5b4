"""``sparsify demo --quick``: the whole pipeline (train, prune with the optimizer, verify, fine-tune, report)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from sparsify.cli import main


def test_demo_quick(tmp_path: Path) -> None:
    assert main(["demo", "--quick", "--out", tmp_path]) == 0
    results = json.loads((tmp_path / "demo.json").read_text())
    assert (tmp_path / "widths.png").stat().st_size > 0
    prune = results["prune"]
    assert prune["outputs_equal"] is True
    assert prune["max_abs_diff"] <= prune["allowed_abs_diff"]
    assert 0 < prune["params_after"] <= prune["params_before"]
    assert 0 < prune["macs_after"] <= prune["macs_before"]
    assert prune["channels_after"] < prune["channels_before"]  # quick settings prune some channels
    for key in ("dense", "str", "finetune"):
        assert 0.0 <= results[key]["test_acc"] <= 1.0
    lat = results["latency_ms"]
    assert lat["before_prune"] > 0 and lat["after_prune"] > 0
    assert {w["group"] for w in results["widths"]}
    assert all(0 < w["after"] <= w["before"] for w in results["widths"])
    assert results["data"]["name"] == "digits"


def test_demo_macs_are_the_graph_cost_of_the_demo_net(tmp_path: Path) -> None:
    """The MACs the demo reports are sparsify.graph.cost's count of the unpruned DemoNet (one image)."""
    import torch

    from sparsify.cli.demo.model import build_model
    from sparsify.graph.cost import module_macs
    from sparsify.graph.trace import trace

    assert main(["demo", "--quick", "--no-baseline", "--out", tmp_path]) == 0
    results = json.loads((tmp_path / "demo.json").read_text())
    model = build_model(results["data"]["image_shape"], results["data"]["classes"], "residual")
    macs = sum(module_macs(trace(model, torch.randn(1, *results["data"]["image_shape"]))).values())
    assert results["prune"]["macs_before"] == macs == 2_116_224
