"""Sparsifier end to end: STR-BN, GMP, slimming, resume, custom plugins, optimizer after prune."""

from __future__ import annotations

import copy
from typing import Literal

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from sparsify import BNGammaConfig, GMPConfig, Sparsifier, SparsifierConfig, SparsifyError, STRConfig
from sparsify.adapters.bn_gamma import BNGammaAdapter
from sparsify.extend import PolicyConfig, PolicyContext, list_policies, register_adapter, register_policy
from sparsify.policies.base import GroupView, Mask, Policy, set_group_masks


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.conv3 = nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(y + self.bn2(self.conv2(y)))
        y = F.relu(self.bn3(self.conv3(y)))
        return self.fc(y.mean((2, 3)))


def _data(n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def _train(model: nn.Module, sp: Sparsifier, opt: torch.optim.Optimizer, steps: int) -> None:
    x, y = _data()
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        sp.step()


def _outputs(model: nn.Module) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(_data()[0])


def test_str_bn_reaches_sparsity_and_pruned_equals_soft() -> None:
    model = SmallCNN()
    with torch.no_grad():  # a spread of γ, as in a trained network
        for bn in (model.bn1, model.bn2, model.bn3):
            bn.weight.uniform_(0.05, 1.0)
    sp = Sparsifier(model, _data()[0][:2], adapter="bn_gamma",
                    policy=STRConfig(s_init=-1.0, threshold_decay=2.0))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    assert len(sp.parameters()) == 3  # one threshold per BN
    _train(model, sp, opt, 40)
    report = sp.report()
    assert report.channel_sparsity > 0.1, report
    assert all(0 < t < 1 for t in report.thresholds.values())
    soft = _outputs(model)
    result = sp.prune(optimizer=opt)
    assert result.params_after < result.params_before and result.macs_after < result.macs_before
    assert torch.allclose(_outputs(model), soft, atol=1e-5, rtol=1e-4)
    assert not any("parametrizations" in n for n, _ in model.named_parameters())
    assert type(model.bn1) is nn.BatchNorm2d  # a plain module again


def test_bn_gamma_zero_channel_emits_exact_zero() -> None:
    """STR-BN's β̂ reparametrisation: a thresholded γ zeroes the bias too."""
    model = SmallCNN().eval()
    with torch.no_grad():
        model.bn1.bias.fill_(0.3)
        model.bn1.weight[:4] = 0.01  # below the threshold sigmoid(-2) ≈ 0.12
        model.bn2.weight[2:6] = -0.01  # bn2 adds into the same residual channels
    sp = Sparsifier(model, _data()[0][:2], "bn_gamma", STRConfig(s_init=-2.0))
    y = model.bn1(torch.randn(2, 16, 4, 4))
    assert torch.equal(y[:, :4], torch.zeros_like(y[:, :4]))
    assert torch.equal(sp.vectors[0].effective()[:4], torch.zeros(4))
    # a residual channel is removable only where both BNs feeding it are zero
    assert set(sp.zero_structures()[sp.groups[0].vectors[0].group.id].tolist()) == {2, 3}


@pytest.mark.parametrize("adapter", ["bn_gamma", "filter_norm"])
@pytest.mark.parametrize("budget", ["uniform", "global"])
def test_gmp_reaches_target_and_prunes_exactly(adapter: str, budget: str) -> None:
    model = SmallCNN()
    sp = Sparsifier(model, _data()[0][:2], adapter, GMPConfig(sparsity=0.5, budget=budget, start_step=2,
                                                              end_step=10, update_every=2))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    _train(model, sp, opt, 4)
    assert 0 < sp.policy.current < 0.5  # the cubic schedule is on its way
    _train(model, sp, opt, 8)
    assert sp.policy.current == pytest.approx(0.5)
    report = sp.report()
    assert report.channel_sparsity == pytest.approx(0.5, abs=0.05)
    soft = _outputs(model)
    sp.prune(optimizer=opt)
    assert torch.allclose(_outputs(model), soft, atol=1e-5, rtol=1e-4)


def test_gmp_macs_budget_meets_target() -> None:
    model = SmallCNN()
    sp = Sparsifier(model, _data()[0][:2], "filter_norm", GMPConfig(sparsity=0.5, unit="macs", budget="global",
                                                                   start_step=0, end_step=1, update_every=1))
    sp.step()
    result = sp.prune()
    assert result.macs_after <= 0.55 * result.macs_before


def test_slimming_l1_shrinks_gamma_and_prunes() -> None:
    torch.manual_seed(0)
    plain, slim = SmallCNN(), None
    slim = copy.deepcopy(plain)
    sp_plain = Sparsifier(plain, _data()[0][:2], "bn_gamma", {"kind": "slimming", "l1": 0.0})
    sp_slim = Sparsifier(slim, _data()[0][:2], "bn_gamma", {"kind": "slimming", "l1": 1e-2, "sparsity": 0.3})
    for model, sp in ((plain, sp_plain), (slim, sp_slim)):
        _train(model, sp, torch.optim.SGD(model.parameters(), lr=0.05), 20)
    gamma = lambda m: m.bn1.parametrizations.weight.original.abs().sum()  # noqa: E731
    assert gamma(slim) < gamma(plain)
    result = sp_slim.prune()
    assert sum(before - after for before, after in result.widths.values()) > 0


def test_resume_gives_identical_thresholds_and_masks() -> None:
    config = SparsifierConfig(adapter="bn_gamma", policy=GMPConfig(sparsity=0.4, end_step=20, update_every=3))
    torch.manual_seed(0)
    model = SmallCNN()
    sp = Sparsifier(model, _data()[0][:2], config=config)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    _train(model, sp, opt, 7)
    saved_model, saved_sp = copy.deepcopy(model.state_dict()), copy.deepcopy(sp.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())
    _train(model, sp, opt, 6)

    torch.manual_seed(123)
    model2 = SmallCNN()
    sp2 = Sparsifier(model2, _data()[0][:2], config=config)
    model2.load_state_dict(saved_model)
    sp2.load_state_dict(saved_sp)
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.05)
    opt2.load_state_dict(saved_opt)
    _train(model2, sp2, opt2, 6)
    for a, b in zip(sp.vectors, sp2.vectors, strict=True):
        assert torch.equal(a.transform.mask, b.transform.mask)
    assert sp2.step_count == sp.step_count == 13
    for (n, p), (_, q) in zip(model.state_dict().items(), model2.state_dict().items(), strict=True):
        assert torch.allclose(p, q, atol=1e-6), n


def test_resume_from_another_model_is_refused() -> None:
    sp = Sparsifier(SmallCNN(), _data()[0][:2], "bn_gamma", "str")
    other = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(256, 2))
    sp2 = Sparsifier(other, _data()[0][:2], "bn_gamma", "str")
    with pytest.raises(SparsifyError, match="different model"):
        sp2.load_state_dict(sp.state_dict())


def test_adapter_that_covers_nothing_says_what_to_do() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(SparsifyError, match="filter_norm"):
        Sparsifier(model, torch.randn(2, 4), "bn_gamma", "str")


def test_config_beside_adapter_or_policy_is_refused() -> None:
    config = SparsifierConfig(adapter="bn_gamma", policy="gmp")
    x = _data()[0][:2]
    with pytest.raises(SparsifyError, match="both config= and adapter=/policy="):
        Sparsifier(SmallCNN(), x, "filter_norm", config=config)
    with pytest.raises(SparsifyError, match="both config= and adapter=/policy="):
        Sparsifier(SmallCNN(), x, policy=GMPConfig(), config=config)
    assert Sparsifier(SmallCNN(), x, config=config).config == config


def test_prune_twice_is_refused() -> None:
    model = SmallCNN()
    sp = Sparsifier(model, _data()[0][:2], "filter_norm", GMPConfig(sparsity=0.3, end_step=1, update_every=1))
    sp.step()
    sp.prune()
    with pytest.raises(SparsifyError, match="already pruned"):
        sp.prune()


def test_optimizer_keeps_working_after_prune() -> None:
    model = SmallCNN()
    sp = Sparsifier(model, _data()[0][:2], "bn_gamma", GMPConfig(sparsity=0.5, end_step=2, update_every=1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    _train(model, sp, opt, 3)
    sp.prune(optimizer=opt)
    for group in opt.param_groups:
        for p in group["params"]:
            state = opt.state.get(p)
            if state and "exp_avg" in state:
                assert state["exp_avg"].shape == p.shape
    model_params = {id(p) for p in model.parameters()}
    assert model_params <= {id(p) for g in opt.param_groups for p in g["params"]}
    x, y = _data()
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = F.cross_entropy(model.train()(x), y)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]


# ----- user-registered plugins -------------------------------------------------------------
class HalfConfig(PolicyConfig):
    """Masks the lower-importance half of each group at once."""

    kind: Literal["test_half"] = "test_half"
    fraction: float = Field(0.5, description="fraction of each group to mask")


class HalfPolicy(Policy):
    def attach(self, groups: list[GroupView], context: PolicyContext) -> None:
        self.groups, self.context = list(groups), context
        for g in groups:
            for v in g.vectors:
                v.adapter.install(v, Mask(len(v)))

    def step(self, step: int) -> None:
        with torch.no_grad():
            for g in self.groups:
                order = np.argsort(g.magnitude())
                keep = np.ones(g.width, dtype=bool)
                keep[order[: int(g.width * self.config.fraction)]] = False
                set_group_masks(g, keep)


class ScaledBNConfig(BNGammaConfig):
    kind: Literal["test_scaled_bn"] = "test_scaled_bn"  # type: ignore[assignment]
    note: str = Field("custom", description="an extra field that must survive round-trips")


class ScaledBNAdapter(BNGammaAdapter):
    pass


register_policy("test_half", HalfConfig, HalfPolicy)
register_adapter("test_scaled_bn", ScaledBNConfig, ScaledBNAdapter)


class EveryOtherConfig(PolicyConfig):
    kind: Literal["test_every_other"] = "test_every_other"


@register_policy("test_every_other", EveryOtherConfig)  # the decorator form
class EveryOtherPolicy(HalfPolicy):
    def step(self, step: int) -> None:
        with torch.no_grad():
            for g in self.groups:
                set_group_masks(g, np.arange(g.width) % 2 == 0)


def test_decorator_registration_and_the_policy_hooks_defaults() -> None:
    assert "test_every_other" in list_policies() and EveryOtherPolicy.kind == "test_every_other"
    model = SmallCNN()
    sp = Sparsifier(model, _data()[0][:2], "bn_gamma", "test_every_other")
    assert isinstance(sp.policy, EveryOtherPolicy)
    assert sp.policy.context.cost_model is sp.macs_model and sp.policy.context.latency_model is None
    assert sp.policy.batched_effective() is None  # declared on Policy, not probed
    sp.step()
    report = sp.report()
    assert report.thresholds == {} and report.channel_sparsity == pytest.approx(0.5)
    with sp.cached():  # no batched values: each parametrization computes its own
        model(_data()[0][:2])
    result = sp.prune()
    text = repr(result)
    assert text.startswith("PruneResult(SmallCNN: params ") and "groups narrower" in text and len(text) < 200


def test_user_registered_adapter_and_policy_work_end_to_end() -> None:
    model = SmallCNN()
    config = SparsifierConfig(adapter={"kind": "test_scaled_bn", "note": "mine"},
                              policy={"kind": "test_half", "fraction": 0.25})
    again = SparsifierConfig.from_yaml(config.to_yaml())
    assert again == config and again.adapter.note == "mine" and again.policy.fraction == 0.25
    sp = Sparsifier(model, _data()[0][:2], config=again)
    sp.step()
    assert sp.report().channel_sparsity == pytest.approx(0.25, abs=0.05)
    soft = _outputs(model)
    sp.prune()
    assert torch.allclose(_outputs(model), soft, atol=1e-5, rtol=1e-4)


def test_str_on_filter_norm_soft_thresholds_whole_filters() -> None:
    """Group soft-thresholding: a structure whose filter norm falls under the threshold is zeroed
    in every producing tensor, and prunes exactly."""
    model = SmallCNN()
    sp = Sparsifier(model, _data()[0][:2], "filter_norm", STRConfig(s_init=-1.0, threshold_decay=1.0))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-2)
    _train(model, sp, opt, 30)
    assert sp.report().channel_sparsity > 0
    soft = _outputs(model)
    sp.prune(optimizer=opt)
    assert torch.allclose(_outputs(model), soft, atol=1e-5, rtol=1e-4)


def test_resume_restores_str_thresholds() -> None:
    config = SparsifierConfig(adapter="bn_gamma", policy=STRConfig(s_init=-3.0, threshold_decay=0.5))
    model = SmallCNN()
    sp = Sparsifier(model, _data()[0][:2], config=config)
    _train(model, sp, torch.optim.SGD(model.parameters(), lr=0.05), 5)
    saved_model, saved_sp = copy.deepcopy(model.state_dict()), copy.deepcopy(sp.state_dict())
    model2 = SmallCNN()
    sp2 = Sparsifier(model2, _data()[0][:2], config=config)
    model2.load_state_dict(saved_model)
    sp2.load_state_dict(saved_sp)
    assert sp2.policy.thresholds() == sp.policy.thresholds()
    assert sp.policy.thresholds()["bn1"] != pytest.approx(float(torch.sigmoid(torch.tensor(-3.0))))
    assert torch.equal(_outputs(model2), _outputs(model))


def test_report_prints_as_a_text_table() -> None:
    """``print(sp.report())`` shows the rendered table, not ``<rich.table.Table object …>``."""
    model = SmallCNN()
    sp = Sparsifier(model, _data()[0][:2], "bn_gamma", STRConfig(s_init=-2.0))
    text = str(sp.report())
    assert "rich.table" not in text and "sparsity:" in text and "MACs in zeros" in text
    assert all(g.name in text for g in sp.report().groups)
