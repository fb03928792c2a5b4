"""sparsify.nn: the modules sparsify puts into models, where they live and what they depend on."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from torch import nn

import sparsify.adapters
import sparsify.nn
from sparsify.graph.trace import trace
from sparsify.nn import ConvAddReLU, ConvReLU, SpaceToDepth, SpaceToDepthConv2d
from sparsify.nn.fused import cudnn_padding

NN_DIR = Path(sparsify.nn.__file__).parent


def test_nn_imports_only_lower_layers() -> None:
    """nn/ sits below adapters, policies and deploy: it may import graph/, measure/, prune/ and _utils only."""
    above = ("sparsify.adapters", "sparsify.policies", "sparsify.deploy", "sparsify.hf", "sparsify.sparsifier",
             "sparsify.oneshot", "sparsify.io", "sparsify.config", "sparsify.cli", "sparsify.distributed")
    for path in NN_DIR.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else (
                [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            bad = [n for n in names if n == "sparsify" or n.startswith(above)]
            assert not bad, f"{path.name} imports {bad}"


def test_modules_live_in_nn_only() -> None:
    for name in ("LowRankLinear", "factorize_", "factorize_linear"):
        assert not hasattr(sparsify.adapters, name) and hasattr(sparsify.nn, name)
    assert set(sparsify.nn.__all__) == {n for n in dir(sparsify.nn) if not n.startswith("_")} - {
        "attention", "fused", "low_rank", "stem"}


@pytest.mark.parametrize(("conv", "max_in", "ok"), [
    (nn.Conv2d(3, 8, 7, stride=2, padding=3), 4, True),
    (nn.Conv2d(3, 8, 7, stride=2, padding=3), 2, False),  # more input channels than allowed
    (nn.Conv2d(3, 8, 7, stride=2, padding=3), None, True),
    (nn.Conv2d(3, 8, 3, stride=1, padding=1), None, False),  # stride 1
    (nn.Conv2d(3, 8, 4, stride=2, padding=1), None, False),  # even kernel
    (nn.Conv2d(4, 8, 3, stride=2, groups=2), None, False),
    (nn.Conv2d(3, 8, 3, stride=2, padding=1, padding_mode="reflect"), None, False),
    (nn.Linear(3, 8), None, False),
])
def test_space_to_depth_supports(conv: nn.Module, max_in: int | None, ok: bool) -> None:
    assert SpaceToDepthConv2d.supports(conv, max_in) is ok


def test_cudnn_padding() -> None:
    assert cudnn_padding(nn.Conv2d(3, 3, 3, padding=1)) == (1, 1)
    assert cudnn_padding(nn.Conv2d(3, 3, 3, padding="valid")) == (0, 0)
    assert cudnn_padding(nn.Conv2d(3, 3, 5, padding="same")) == (2, 2)
    assert cudnn_padding(nn.Conv2d(3, 3, 4, padding="same")) is None  # asymmetric
    assert cudnn_padding(nn.Conv2d(3, 3, 3, padding=1, padding_mode="circular")) is None


class _Deployed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.relu = ConvReLU(nn.Conv2d(3, 4, 3, padding=1))
        self.add = ConvAddReLU(nn.Conv2d(4, 4, 3, padding=1))
        self.s2d = SpaceToDepth((1, 1), 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(x)
        return self.s2d(self.add(y, y))


def test_deploy_modules_trace_as_leaves() -> None:
    """Their graph registration comes with the module: a model holding them traces them as single nodes."""
    graph = trace(_Deployed().eval(), torch.randn(1, 3, 8, 8)).graph_module.graph
    assert [n.target for n in graph.nodes if n.op == "call_module"] == ["relu", "add", "s2d"]
