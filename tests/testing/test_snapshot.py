"""sparsify.testing.snapshot: assert_unchanged passes on an untouched model and names each kind of change."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from sparsify.testing.snapshot import assert_unchanged, snapshot


def _model_and_optimizer() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(5, 3)).sum().backward()
    opt.step()
    return model, opt


def test_untouched_model_passes() -> None:
    model, opt = _model_and_optimizer()
    before = snapshot(model, opt)
    model.eval()
    with torch.no_grad():
        model(torch.randn(2, 3))
    model.train()
    assert_unchanged(before, model, opt)


CHANGES: dict[str, tuple[Callable[[nn.Module, torch.optim.Optimizer], object], str]] = {
    "value": (lambda m, o: m[0].weight.data.add_(1e-7), "values changed"),
    "new tensor object": (lambda m, o: setattr(m[0], "weight", nn.Parameter(m[0].weight.detach().clone())), "object"),
    "parametrization": (lambda m, o: weight_norm(m[2]), "parametrizations|class"),
    "buffer added": (lambda m, o: m[0].register_buffer("extra", torch.zeros(1)), "added"),
    "attribute": (lambda m, o: setattr(m[0], "in_features", 2), "attributes"),
    "hook": (lambda m, o: m[0].register_forward_hook(lambda *a: None), "attributes"),
    "mode": (lambda m, o: m.eval(), "modes"),
    "optimizer state": (lambda m, o: o.state[m[0].weight]["exp_avg"].add_(1.0), "optimizer state"),
    "optimizer groups": (lambda m, o: o.param_groups[0].update(lr=1.0), "param_groups"),
    "grad": (lambda m, o: m[0].weight.grad.zero_(), "grad:0.weight"),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_each_change_is_reported(change: str) -> None:
    model, opt = _model_and_optimizer()
    before = snapshot(model, opt)
    apply, message = CHANGES[change]
    apply(model, opt)
    with pytest.raises(AssertionError, match=message):
        assert_unchanged(before, model, opt)
