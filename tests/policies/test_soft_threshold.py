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


@pytest.mark.parametrize("adapter", ["bn_gamma", "filter_norm"])
@pytest.mark.parametrize("mode", ["cached", "batched"])
def test_cached_forward_gives_the_same_values_and_gradients(mode: str, adapter: str) -> None:
    from sparsify.testing.models import MODELS

    results = []
    for use in ("plain", mode):
        torch.manual_seed(0)
        model, x = MODELS["residual_cnn"]()
        sp = Sparsifier(model, x, adapter, STRConfig(s_init=-1.5 if adapter == "bn_gamma" else 0.0,
                                                     granularity="group"))
        with sp.cached(batched=use == "batched") if use != "plain" else torch.enable_grad():
            out = model(x)
        F.mse_loss(out, torch.ones_like(out)).backward()
        results.append((out.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (out_a, grads_a), (out_b, grads_b) = results
    assert torch.equal(out_a, out_b) and (sp.zero_structures() or True)
    assert len(grads_a) == len(grads_b) > 0
    assert all(torch.allclose(a, b, atol=1e-7) for a, b in zip(grads_a, grads_b, strict=True))
    assert any(float(p.grad.abs().sum()) > 0 for p in sp.parameters())  # thresholds get gradients too


@pytest.mark.parametrize("batched", [False, True])
def test_cached_filter_norm_forward_computes_each_vectors_norms_once(monkeypatch, batched: bool) -> None:
    """Inside ``Sparsifier.cached()`` every parametrized tensor of a vector (each conv, BN γ and β of a
    residual stream) reads one norm computation per forward; before, each recomputed all of the vector's norms."""
    from sparsify.adapters import filter_norm
    from sparsify.testing.models import MODELS

    torch.manual_seed(0)
    model, x = MODELS["residual_cnn"]()
    sp = Sparsifier(model, x, "filter_norm", STRConfig(s_init=0.0))
    calls: list[int] = []
    norms = filter_norm.structure_norms
    monkeypatch.setattr(filter_norm, "structure_norms", lambda v, p: calls.append(id(v)) or norms(v, p))
    assert any(len(v.handle["scaled"]) > 1 for v in sp.vectors)
    with sp.cached(batched=batched):
        model(x)
    assert sorted(calls) == sorted(id(v) for v in sp.vectors)
    calls.clear()
    model(x)  # outside the cache: each parametrization computes its own (as torch's parametrize does)
    assert len(calls) == sum(len(v.handle["scaled"]) for v in sp.vectors)
