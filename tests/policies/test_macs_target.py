"""Exact MACs of a plan (MacsModel) and the STR budget controller that hits a MACs target."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sparsify import Sparsifier, STRConfig, build_channel_graph, prune_channels
from sparsify.graph.cost import MacsModel, module_macs
from sparsify.graph.trace import trace
from sparsify.testing.oracle import random_plan


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_macs_model_matches_the_pruned_network(tv, name: str) -> None:
    model = tv.models.get_model(name, num_classes=10).eval()
    x = torch.randn(1, 3, 64, 64)
    cg = build_channel_graph(model, x)
    mm = MacsModel(cg)
    plan = random_plan(cg, 0.4, exact_only=False, seed=3)
    keep = {}
    for gid, removed in plan.items():
        k = np.ones(cg.group(gid).width, dtype=bool)
        k[removed] = False
        keep[gid] = k
    predicted = mm.after(keep)
    assert mm.total == sum(module_macs(cg.traced).values())
    prune_channels(cg, plan, allow_inexact=True, verify_atol=None)
    actual = sum(module_macs(trace(model, x)).values())
    assert predicted < 0.8 * mm.total  # the plan removes a real share …
    assert predicted == pytest.approx(actual, rel=1e-9)  # … and the model predicts it exactly


def _cnn() -> torch.nn.Module:
    def block(i: int, o: int, stride: int = 1) -> list[torch.nn.Module]:
        return [torch.nn.Conv2d(i, o, 3, stride, 1, bias=False), torch.nn.BatchNorm2d(o), torch.nn.ReLU()]

    model = torch.nn.Sequential(*block(3, 16), *block(16, 32), *block(32, 32, 2), *block(32, 64), *block(64, 64, 2),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(64, 10))
    for m in model.modules():  # a spread of γ as after some training
        if isinstance(m, torch.nn.BatchNorm2d):
            torch.nn.init.uniform_(m.weight, 0.05, 1.5)
    return model


@pytest.mark.parametrize("target", [0.5, 0.75])
def test_str_controller_reaches_a_macs_target(target: float) -> None:
    torch.manual_seed(0)
    model = _cnn()
    x, y = torch.randn(32, 3, 16, 16), torch.randint(0, 10, (32,))
    cfg = STRConfig(s_init=-6.0, threshold_fn="exp", target=target, target_start_step=5, target_end_step=50,
                    control_every=1)
    sp = Sparsifier(model, x[:2], "bn_gamma", cfg)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for _ in range(80):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        sp.step()
    measured = sp.policy.measured_sparsity()
    assert abs(measured - target) < 0.02, measured
    thresholds = list(sp.policy.thresholds().values())
    assert max(thresholds) > 1.02 * min(thresholds)  # the loss still moves each layer's threshold
    model.eval()
    with torch.no_grad():
        soft = model(x)
    result = sp.prune()
    assert result.macs_before / result.macs_after == pytest.approx(1 / (1 - measured), rel=1e-6)
    with torch.no_grad():
        assert torch.allclose(model(x), soft, atol=1e-4)


def test_str_target_config_is_checked() -> None:
    with pytest.raises(ValueError, match="target_end_step"):
        STRConfig(target=0.5, target_start_step=100, target_end_step=50)
    with pytest.raises(ValueError):
        STRConfig(target=1.5)


@pytest.mark.parametrize("cap", [0.8, 1.0])
def test_str_controller_does_not_empty_a_layer(cap: float) -> None:
    """The controller alone (no training: lr 0) shifts all thresholds together; a layer far weaker
    than the others would be emptied (cap 1.0 shows it) unless the per-vector cap stops its push."""
    torch.manual_seed(0)
    model = _cnn()
    with torch.no_grad():
        model[4].weight.mul_(0.02)
    cfg = STRConfig(s_init=-6.0, threshold_fn="exp", target=0.6, target_start_step=2, target_end_step=30,
                    control_every=1, max_vector_sparsity=cap)
    sp = Sparsifier(model, torch.randn(2, 3, 16, 16), "bn_gamma", cfg)
    weak = next(v for v in sp.vectors if v.handle is model[4])
    worst = 0.0
    for _ in range(150):
        sp.step()
        with torch.no_grad():
            worst = max(worst, float((weak.effective() == 0).float().mean()))
    if cap < 1:
        assert worst < 1.0  # never emptied …
        assert sp.policy.measured_sparsity() > 0.55  # … while the other layers carry the target
    else:
        assert worst == 1.0


def test_unreachable_macs_target_with_round_to_blames_the_rounding() -> None:
    from sparsify import GMPConfig, SparsifierConfig

    model = _cnn()
    config = SparsifierConfig(adapter="filter_norm", policy=GMPConfig(sparsity=0.9, unit="macs", end_step=10),
                              round_to=64)
    sp = Sparsifier(model, torch.randn(2, 3, 16, 16), config=config)
    with pytest.raises(ValueError, match="round_to=64"):
        sp.policy.update(0.9)


class _Block(torch.nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Conv2d(width, width, 3, padding=1), torch.nn.BatchNorm2d(width),
                                        torch.nn.ReLU(), torch.nn.Conv2d(width, width, 3, padding=1),
                                        torch.nn.BatchNorm2d(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.body(x))


@pytest.mark.parametrize("budget", ["erk", "uniform"])
def test_macs_target_is_met_closely_when_many_layers_share_a_shape(budget: str) -> None:
    """ERK and uniform give every same-shaped layer the same width, so their allocations move in big
    steps (all blocks at once); the last step is taken one structure at a time (was 4.36× for 4×)."""
    from sparsify import GMPConfig

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
                                *[_Block(16) for _ in range(6)], torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                torch.nn.Linear(16, 10))
    cfg = GMPConfig(sparsity=0.75, unit="macs", budget=budget, start_step=0, end_step=1)
    sp = Sparsifier(model, torch.randn(2, 3, 8, 8), "filter_norm", cfg)
    sp.policy.update(0.75)
    result = sp.prune()
    removed = 1 - result.macs_after / result.macs_before
    assert 0.75 <= removed < 0.755, removed
