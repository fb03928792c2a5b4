"""A pruned model is a plain nn.Module: it exports to ONNX and onnxruntime computes the same outputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from sparsify import build_channel_graph, prune_channels
from sparsify.testing.oracle import random_plan

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small"])
def test_pruned_model_exports_to_onnx_and_matches(tv, name: str, tmp_path: Path) -> None:
    model = tv.models.get_model(name).eval()
    x = torch.randn(2, 3, 64, 64)
    cg = build_channel_graph(model, x)
    report = prune_channels(cg, random_plan(cg, 0.5))
    assert report.params_after < report.params_before
    path = tmp_path / f"{name}.onnx"
    torch.onnx.export(model, (x,), dynamo=True).save(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        ref = model(x).numpy()
    assert np.abs(out - ref).max() <= 1e-4 * (1 + np.abs(ref).max())
