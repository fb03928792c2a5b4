"""The STR controller's per-vector caps (vectorised) equal a plain per-vector computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sparsify.policies.allocation.str_controller import cap_thresholds


def _plain(vectors: list[torch.Tensor], cap: float) -> torch.Tensor:
    out = []
    for m in vectors:
        allowed = int(np.floor(cap * len(m) + 1e-9))
        if allowed >= len(m):
            out.append(float("inf"))
            continue
        ordered = torch.sort(m.double()).values
        first_kept = ordered[allowed]
        below = ordered[ordered < first_kept]
        out.append(max(0.5 * (float(below[-1]) + float(first_kept)) if len(below) else 0.5 * float(first_kept),
                       1e-30))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("cap", [0.0, 0.3, 0.5, 0.9, 1.0])
def test_caps_match_the_plain_computation_with_ties(cap: float) -> None:
    g = torch.Generator().manual_seed(0)
    for trial in range(60):
        lengths = [int(x) for x in torch.randint(1, 12, (int(torch.randint(1, 8, (1,), generator=g)),), generator=g)]
        vectors = [torch.randint(0, 5, (n,), generator=g).float() / 4 if trial % 2 else torch.rand(n, generator=g)
                   for n in lengths]  # odd trials: many ties
        caps = cap_thresholds(torch.cat(vectors), lengths, cap)
        assert torch.equal(caps, _plain(vectors, cap))
        for v, c in zip(vectors, caps, strict=True):  # and the cap does what it says (exact zeros stay zeros)
            assert int(((v.double() <= c) & (v > 0)).sum()) <= int(np.floor(cap * len(v) + 1e-9))


def _cnn(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    layers: list[torch.nn.Module] = []
    for i, o in [(3, 16), (16, 32), (32, 32), (32, 64)]:
        layers += [torch.nn.Conv2d(i, o, 3, padding=1, bias=False), torch.nn.BatchNorm2d(o), torch.nn.ReLU()]
    model = torch.nn.Sequential(*layers, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(64, 10))
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            torch.nn.init.uniform_(m.weight, 0.05, 1.5)
    return model


def _str(model: torch.nn.Module, lag: int, every: int = 10):
    from sparsify import Sparsifier, STRConfig

    cfg = STRConfig(s_init=-6.0, threshold_fn="exp", target=0.5, target_start_step=0, target_end_step=every,
                    control_every=every, control_lag=lag)
    return Sparsifier(model, torch.randn(2, 3, 8, 8), "bn_gamma", cfg)


def _s(sp) -> torch.Tensor:
    return torch.cat([t.s.detach() for t in sp.policy.transforms])


def test_a_deferred_update_changes_the_thresholds_lag_steps_later_as_the_immediate_one() -> None:
    now, later = _str(_cnn(), lag=0), _str(_cnn(), lag=3)
    for _ in range(10):
        now.step()
        later.step()
    assert not torch.equal(_s(now), _s(later))  # step 10: read, not yet applied
    before = _s(later)
    for _ in range(2):
        later.step()
    assert torch.equal(_s(later), before)
    later.step()  # step 13: applied
    assert torch.allclose(_s(later), _s(now), rtol=1e-6, atol=0)
    assert later.policy.measured_sparsity() == pytest.approx(now.policy.measured_sparsity(), abs=1e-12)
    assert now.policy.measured_sparsity() >= 0.5


def test_a_deferred_update_applies_the_shift_to_the_thresholds_as_they_are_then() -> None:
    sp = _str(_cnn(), lag=2)
    ref = _str(_cnn(), lag=0)
    for _ in range(10):
        sp.step()
        ref.step()
    delta = _s(ref) + 6.0  # the shift the controller chose (from s_init = -6)
    with torch.no_grad():  # the loss moves one threshold between reading and applying
        sp.policy.transforms[1].s.add_(0.25)
    sp.step()
    sp.step()
    expected = torch.full_like(delta, -6.0) + delta
    expected[1] += 0.25
    assert torch.allclose(_s(sp), expected, rtol=0, atol=1e-5)


def test_a_pending_update_survives_state_dict_and_finalize_drops_it() -> None:
    a = _str(_cnn(), lag=3)
    for _ in range(11):
        a.step()
    b = _str(_cnn(), lag=3)
    b.load_state_dict(a.state_dict())
    for _ in range(2):
        a.step()
        b.step()
    assert torch.equal(_s(a), _s(b))
    assert not torch.equal(_s(a), torch.full_like(_s(a), -6.0))
    c = _str(_cnn(), lag=3)
    for _ in range(10):
        c.step()
    c.policy.finalize()  # prune() path: pending dropped, the target reached now
    assert c.policy.__dict__.get("_pending") is None
    assert c.policy.measured_sparsity() == pytest.approx(0.5, abs=0.03)
