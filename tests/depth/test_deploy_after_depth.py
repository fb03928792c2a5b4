"""Deployment of depth-pruned networks: the activation a removed branch leaves behind costs no kernel."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx
from torch import nn

from sparsify.deploy import deploy
from sparsify.deploy.redundant import drop_repeated_activations
from sparsify.depth import remove_residual_branches, residual_branches

torchvision = pytest.importorskip("torchvision")


def test_depth_pruned_resnet_deploys_without_standalone_relus() -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet50().eval()
    x = torch.randn(2, 3, 64, 64)
    remove_residual_branches(model, residual_branches(model, x)[::2])
    deployed = deploy(model, x)
    relus = [n for n in deployed.graph.nodes if n.op == "call_module" and
             isinstance(deployed.get_submodule(str(n.target)), nn.ReLU)]
    assert relus == []
    with torch.no_grad():
        assert torch.allclose(deployed(x), model(x), rtol=1e-4, atol=1e-5)


class _Chain(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.relu(torch.relu(x))  # dropped
        b = nn.functional.relu6(torch.relu(x))  # kept: relu6 caps a ReLU's output
        c = nn.functional.relu(nn.functional.relu6(x))  # dropped: relu6's output is already ≥ 0
        d = nn.functional.hardtanh(nn.functional.relu6(x), 0.0, 8.0)  # dropped: [0, 6] ⊂ [0, 8]
        e = nn.functional.relu(x - 1)  # kept: the input's sign is unknown
        return torch.stack([a, b, c, d, e])


def test_only_activations_that_change_nothing_are_dropped() -> None:
    gm = fx.symbolic_trace(_Chain())
    x = torch.randn(1000) * 10
    expected = gm(x)
    dropped = drop_repeated_activations(gm)
    assert len(dropped) == 3
    assert torch.equal(gm(x), expected)
