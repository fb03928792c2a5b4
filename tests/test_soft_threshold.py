"""The soft threshold's hand-written backward equals autograd of sign(v)·relu(|v| − τ)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sparsify import Sparsifier, STRConfig
from sparsify.policies.soft_threshold import SoftThreshold, _SoftThresholdFn


@pytest.mark.parametrize("threshold_fn", ["sigmoid", "exp"])
def test_forward_and_gradients_match_the_formula(threshold_fn: str) -> None:
    t = SoftThreshold(-1.0, threshold_fn=threshold_fn).double()
    raw = torch.randn(64, dtype=torch.float64, requires_grad=True)
    g = torch.randn(64, dtype=torch.float64)
    out = t(raw)
    (out * g).sum().backward()
    got = raw.grad.clone(), t.s.grad.clone()
    raw.grad, t.s.grad = None, None
    ref = torch.sign(raw) * torch.relu(raw.abs() - t.g(t.s))
    (ref * g).sum().backward()
    assert torch.equal(out, ref) and 0 < int((out == 0).sum()) < 64
    assert torch.allclose(got[0], raw.grad) and torch.allclose(got[1], t.s.grad)


def test_gradcheck() -> None:
    raw = torch.randn(32, dtype=torch.float64, requires_grad=True)
    tau = torch.full((1,), 0.4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_SoftThresholdFn.apply, (raw, tau))


def test_cached_forward_gives_the_same_gradients() -> None:
    from sparsify.testing.models import MODELS

    torch.manual_seed(0)
    grads = []
    for cached in (False, True):
        torch.manual_seed(0)
        model, x = MODELS["residual_cnn"]()
        sp = Sparsifier(model, x, "bn_gamma", STRConfig(s_init=-2.0))
        with sp.cached() if cached else torch.enable_grad():
            out = model(x)
        F.mse_loss(out, torch.zeros_like(out)).backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1]) > 0
    assert all(torch.allclose(a, b) for a, b in zip(*grads, strict=True))
