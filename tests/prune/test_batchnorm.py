"""recalibrate_batchnorm: fresh running statistics, the model's mode and momenta restored."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sparsify import SparsifyError, recalibrate_batchnorm


def _net() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8, momentum=0.3), nn.ReLU(), nn.Conv2d(8, 4, 1),
                         nn.BatchNorm2d(4))


def test_running_statistics_are_the_average_over_the_batches() -> None:
    torch.manual_seed(0)
    model = _net().eval()
    batches = [torch.randn(16, 3, 10, 10) * (1 + i) for i in range(3)]
    inputs: list[torch.Tensor] = []
    model[1].register_forward_hook(lambda m, args, out: inputs.append(args[0].detach()))
    with torch.no_grad():
        model[1].running_mean.fill_(5.0)  # stale statistics
    assert recalibrate_batchnorm(model, iter(batches)) == 3
    means = torch.stack([x.mean((0, 2, 3)) for x in inputs])
    variances = torch.stack([x.transpose(0, 1).flatten(1).var(1, unbiased=True) for x in inputs])
    assert torch.allclose(model[1].running_mean, means.mean(0), atol=1e-5)
    assert torch.allclose(model[1].running_var, variances.mean(0), rtol=1e-4)
    assert not model.training and model[1].momentum == 0.3 and model[4].momentum == 0.1
    assert all(p.grad is None for p in model.parameters())


def test_max_batches_and_bad_inputs() -> None:
    model = _net().train()
    batches = (torch.randn(4, 3, 10, 10) for _ in range(10))
    assert recalibrate_batchnorm(model, batches, max_batches=2) == 2
    assert model.training and int(model[1].num_batches_tracked) == 2
    with pytest.raises(SparsifyError, match="no BatchNorm"):
        recalibrate_batchnorm(nn.Linear(2, 2), [torch.randn(1, 2)])
    before = model[1].running_mean.clone()
    with pytest.raises(SparsifyError, match="gave no batch"):
        recalibrate_batchnorm(model, [])
    assert torch.equal(model[1].running_mean, before)  # bad input: nothing was reset
