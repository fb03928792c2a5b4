"""Misuse of the model side (issue #17): each case ends in a clear error that names the problem and the
fix with the model, optimizer and parametrizations bit-identical to before (``assert_unchanged``), or
in a correct result (outputs equal to the soft model's)."""

from __future__ import annotations

import copy
import re
from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch import nn
from torch.ao.pruning.sparsifier.utils import FakeSparsity
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import orthogonal, spectral_norm, weight_norm

from sparsify import Sparsifier, build_channel_graph, prune_channels
from sparsify.adapters.filter_norm import FilterNormConfig
from sparsify.config import SparsifierConfig
from sparsify.errors import PruneError, SparsifyError, TraceError
from sparsify.policies.gradual_magnitude import GMPConfig
from sparsify.prune.surgery import _eval_outputs
from sparsify.testing.snapshot import assert_unchanged, snapshot

GMP = {"kind": "gmp", "sparsity": 0.5, "start_step": 0, "end_step": 1}


def cnn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 6, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 6))


X = torch.randn(2, 3, 8, 8)


class Double(nn.Module):
    """A user's own parametrization."""

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return 2 * w


PARAMETRIZE: dict[str, Callable[[nn.Module], None]] = {
    "weight_norm": lambda m: weight_norm(m[3]),
    "spectral_norm": lambda m: spectral_norm(m[3]),
    "orthogonal": lambda m: orthogonal(m[10]),
    "fake_sparsity": lambda m: parametrize.register_parametrization(m[3], "weight", FakeSparsity(
        torch.ones_like(m[3].weight))),
    "user_parametrization": lambda m: parametrize.register_parametrization(m[3], "weight", Double()),
}


def _soft_then_prune(sp: Sparsifier, model: nn.Module, x: torch.Tensor = X) -> None:
    """Train one GMP step, prune, and check the pruned model computes what the soft one did."""
    sp.step()
    model.eval()
    with torch.no_grad():
        soft = model(x)
    result = sp.prune()
    with torch.no_grad():
        assert torch.allclose(model(x), soft, atol=1e-5)
    assert result.params_after < result.params_before


# ----- parametrizations: groups under them are left out, the rest prunes exactly ----------------
@pytest.mark.parametrize("kind", list(PARAMETRIZE))
def test_sparsifier_leaves_out_parametrized_channels_and_prunes_the_rest(kind: str) -> None:
    model = cnn()
    PARAMETRIZE[kind](model)
    holder = model[10] if kind == "orthogonal" else model[3]
    plist = holder.parametrizations.weight
    before = [id(p) for p in plist]
    sp = Sparsifier(model, X, adapter="filter_norm", policy=GMP)
    blocked = {g.name for g in sp.graph.groups if any("is parametrized" in b and "remove_parametrizations" in b
                                                      for b in g.blocked)}
    assert blocked and not blocked & {g.name for g in sp.groups}
    _soft_then_prune(sp, model)
    assert [id(p) for p in holder.parametrizations.weight] == before  # theirs survives, untouched


@pytest.mark.parametrize("kind", list(PARAMETRIZE))
def test_prune_channels_refuses_a_parametrized_group_untouched(kind: str) -> None:
    model = cnn()
    PARAMETRIZE[kind](model)
    cg = build_channel_graph(model, X)
    group = next(g for g in cg.groups if any("is parametrized" in b for b in g.blocked))
    before = snapshot(model)
    with pytest.raises(PruneError, match="remove_parametrizations"):
        prune_channels(cg, {group.id: [0, 1]}, verify_atol=1e-5)
    assert_unchanged(before, model)


def test_sparsifier_with_every_group_parametrized_fails_naming_the_parametrization() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1))
    weight_norm(model[2])
    before = snapshot(model)
    with pytest.raises(SparsifyError, match=r"parametrized \(_WeightNorm.*remove_parametrizations") as err:
        Sparsifier(model, X, adapter="filter_norm", policy=GMP)
    assert "Try adapter='filter_norm'" not in str(err.value)  # no longer suggests the adapter in use
    assert_unchanged(before, model)


# ----- wrappers -----------------------------------------------------------------------------------
WRAPPERS: dict[str, tuple[Callable[[nn.Module], nn.Module], str]] = {
    "data_parallel": (nn.DataParallel, r"\.module"),
    "torch_compile": (torch.compile, "_orig_mod"),
    "jit_script": (torch.jit.script, "TorchScript"),
    "jit_trace": (lambda m: torch.jit.trace(m.eval(), X), "TorchScript"),
    "nested_data_parallel": (lambda m: nn.Sequential(nn.DataParallel(m)), r"submodule '0'.*\.module"),
}


@pytest.mark.parametrize("kind", list(WRAPPERS))
@pytest.mark.parametrize("entry", ["sparsifier", "channel_graph"])
def test_wrapped_models_are_refused_with_how_to_unwrap(kind: str, entry: str) -> None:
    inner = cnn()
    wrap, fix = WRAPPERS[kind]
    wrapped = wrap(inner)
    before = snapshot(inner)
    with pytest.raises(TraceError, match=fix):
        if entry == "sparsifier":
            Sparsifier(wrapped, X, adapter="filter_norm", policy=GMP)
        else:
            build_channel_graph(wrapped, X)
    assert_unchanged(before, inner)


def test_quantized_model_is_refused() -> None:
    model = torch.ao.quantization.quantize_dynamic(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)),
                                                   {nn.Linear}, dtype=torch.qint8)
    with pytest.raises(TraceError, match=r"quantized.*float model"):
        Sparsifier(model, torch.randn(2, 4), adapter="filter_norm", policy=GMP)


def test_graph_module_is_fine() -> None:
    gm = torch.fx.symbolic_trace(cnn())
    sp = Sparsifier(gm, X, adapter="filter_norm", policy=GMP)
    _soft_then_prune(sp, gm)


# ----- two Sparsifiers, calls after prune() ------------------------------------------------------
def test_second_sparsifier_on_one_model_is_refused_untouched() -> None:
    model = cnn()
    Sparsifier(model, X, adapter="filter_norm", policy=GMP)
    before = snapshot(model)
    with pytest.raises(SparsifyError, match=r"already carries a Sparsifier.s masks.*prune\(\)"):
        Sparsifier(model, X, adapter="bn_gamma", policy="str")
    assert_unchanged(before, model)


def test_prune_channels_refuses_a_model_with_live_masks() -> None:
    model = cnn()
    sp = Sparsifier(model, X, adapter="filter_norm", policy=GMP)
    before = snapshot(model)
    with pytest.raises(PruneError, match="that Sparsifier's prune"):
        prune_channels(sp.graph, {sp.groups[0].vectors[0].group.id: [0]})
    assert_unchanged(before, model)


def test_a_new_sparsifier_on_the_pruned_model_works() -> None:
    model = cnn()
    sp = Sparsifier(model, X, adapter="filter_norm", policy=GMP)
    _soft_then_prune(sp, model)
    _soft_then_prune(Sparsifier(model, X, adapter="filter_norm", policy=GMP), model)


@pytest.mark.parametrize("call", ["report", "zero_structures", "step", "prune", "state_dict_then_prune"])
def test_calls_after_prune_say_the_sparsifier_is_done(call: str) -> None:
    model = cnn()
    sp = Sparsifier(model, X, adapter="filter_norm", policy=GMP)
    sp.step()
    sp.prune()
    before = snapshot(model)
    with pytest.raises(SparsifyError, match="already pruned"):
        if call == "state_dict_then_prune":
            sp.state_dict()
            sp.prune()
        else:
            getattr(sp, call)()
    assert_unchanged(before, model)


def test_prune_channels_twice_with_one_graph_is_refused() -> None:
    model = cnn()
    cg = build_channel_graph(model, X)
    prune_channels(cg, {cg.prunable_groups()[0].id: [0]})
    before = snapshot(model)
    with pytest.raises(PruneError, match="Build a new one"):
        prune_channels(cg, {cg.prunable_groups()[0].id: [1]})
    assert_unchanged(before, model)


# ----- the constructor is atomic ------------------------------------------------------------------
def test_constructor_failing_in_the_policy_leaves_nothing_behind() -> None:
    model = cnn()
    before = snapshot(model)
    with pytest.raises(ValueError, match="slimming needs an adapter whose raw vector is a parameter"):
        Sparsifier(model, X, adapter="filter_norm", policy="slimming")
    assert_unchanged(before, model)


def test_constructor_failing_after_some_installs_leaves_nothing_behind(monkeypatch: pytest.MonkeyPatch) -> None:
    from sparsify.adapters.bn_gamma import BNGammaAdapter
    model = cnn()
    before = snapshot(model)
    real, calls = BNGammaAdapter.install, []

    def flaky(self, vector, transform):
        calls.append(vector)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return real(self, vector, transform)

    monkeypatch.setattr(BNGammaAdapter, "install", flaky)
    with pytest.raises(RuntimeError, match="boom"):
        Sparsifier(model, X, adapter="bn_gamma", policy="str")
    assert_unchanged(before, model)


def test_constructor_with_a_bad_latency_model_leaves_nothing_behind() -> None:
    model = cnn()
    before = snapshot(model)
    with pytest.raises(SparsifyError, match="latency_model must be"):
        Sparsifier(model, X, adapter="filter_norm", policy=GMP, latency_model=lambda cg: 3)
    assert_unchanged(before, model)


def test_bad_example_inputs_leave_the_model_untouched() -> None:
    model = cnn()
    before = snapshot(model)
    with pytest.raises(TraceError, match="example_inputs"):
        Sparsifier(model, torch.randn(2, 5, 8, 8), adapter="filter_norm", policy=GMP)
    assert_unchanged(before, model)


# ----- inexact groups are decided at construction -------------------------------------------------
class ChannelLN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem, self.ln, self.mid = nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln(self.stem(x))
        return self.head(torch.relu(self.mid(h)))


XT = torch.randn(4, 4)


def test_inexact_groups_are_left_out_by_default_and_named() -> None:
    model = ChannelLN()
    sp = Sparsifier(model, XT, adapter="filter_norm", policy=GMP)
    assert any("include_inexact=True" in why for why in sp.adapter.skipped.values())
    assert all(g.exact for g in sp.report().groups)
    sp.step()
    sp.prune()  # no InexactPruneError after training


def test_include_inexact_with_output_check_is_refused_at_construction() -> None:
    model = ChannelLN()
    before = snapshot(model)
    with pytest.raises(SparsifyError, match="verify_atol=None"):
        Sparsifier(model, XT, config=SparsifierConfig(adapter=FilterNormConfig(include_inexact=True),
                                                      policy=GMPConfig(**GMP)))
    assert_unchanged(before, model)


def test_include_inexact_opted_in_is_named_in_the_report_and_pruned() -> None:
    model = ChannelLN()
    sp = Sparsifier(model, XT, config=SparsifierConfig(adapter=FilterNormConfig(include_inexact=True),
                                                      policy=GMPConfig(**GMP), verify_atol=None))
    assert any(not g.exact for g in sp.report().groups)
    sp.step()
    result = sp.prune()
    assert result.params_after < result.params_before


# ----- optimizers ---------------------------------------------------------------------------------
def _trained_sgd(model: nn.Module) -> torch.optim.Optimizer:
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(X).sum().backward()
    opt.step()
    opt.zero_grad()
    return opt


def test_optimizer_over_another_model_is_refused_untouched() -> None:
    model, other = cnn(), cnn()
    opt = _trained_sgd(other)
    cg = build_channel_graph(model, X)
    before, opt_before = snapshot(model), snapshot(other, opt)
    with pytest.raises(PruneError, match="none of them this model's"):
        prune_channels(cg, {cg.prunable_groups()[0].id: [0]}, optimizer=opt)
    assert_unchanged(before, model)
    assert_unchanged(opt_before, other, opt)


def test_sparsifier_prune_with_another_models_optimizer_is_refused_untouched() -> None:
    model, other = cnn(), cnn()
    sp = Sparsifier(model, X, adapter="filter_norm", policy=GMP)
    sp.step()
    opt = _trained_sgd(other)
    before = snapshot(model)
    with pytest.raises(PruneError, match="none of them this model's"):
        sp.prune(optimizer=opt)
    assert_unchanged(before, model)
    _soft_then_prune(sp, model)  # still usable after the refusal


@pytest.mark.parametrize("entry", ["prune_channels", "sparsifier"])
def test_lbfgs_is_refused_untouched(entry: str) -> None:
    model = cnn()
    opt = torch.optim.LBFGS(model.parameters(), max_iter=2)
    opt.step(lambda: model(X).square().mean().backward() or model(X).square().mean())
    if entry == "sparsifier":
        sp = Sparsifier(model, X, adapter="filter_norm", policy=GMP)
        sp.step()
    before = snapshot(model, opt)
    with pytest.raises(PruneError, match=r"LBFGS.*optimizer=None"):
        if entry == "sparsifier":
            sp.prune(optimizer=opt)
        else:
            cg = build_channel_graph(model, X)
            prune_channels(cg, {cg.prunable_groups()[0].id: [0]}, optimizer=opt)
    assert_unchanged(before, model, opt)


class FactoredState(torch.optim.SGD):
    """An optimizer whose state is not per element (like Adafactor's row/column statistics)."""

    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p]["row"] = torch.ones(p.shape[0] + 1)
        return None


def test_unsliceable_optimizer_state_is_refused_untouched() -> None:
    model = cnn()
    opt = FactoredState(model.parameters(), lr=0.1)
    opt.step()
    cg = build_channel_graph(model, X)
    before = snapshot(model, opt)
    with pytest.raises(PruneError, match="cannot be sliced with it"):
        prune_channels(cg, {cg.prunable_groups()[0].id: [0]}, optimizer=opt)
    assert_unchanged(before, model, opt)


def test_not_an_optimizer_is_refused() -> None:
    model = cnn()
    cg = build_channel_graph(model, X)
    with pytest.raises(PruneError, match=r"torch\.optim\.Optimizer"):
        prune_channels(cg, {cg.prunable_groups()[0].id: [0]}, optimizer=[p for p in model.parameters()])


def test_momentum_is_sliced_with_the_parameters() -> None:
    model = cnn()
    opt = _trained_sgd(model)
    momentum = opt.state[model[0].weight]["momentum_buffer"].clone()
    cg = build_channel_graph(model, X)
    prune_channels(cg, {cg.group("0").id: [2, 5]}, optimizer=opt)
    keep = [i for i in range(8) if i not in (2, 5)]
    assert torch.equal(opt.state[model[0].weight]["momentum_buffer"], momentum[keep])


# ----- the model changed between building and pruning ---------------------------------------------
def test_module_replaced_after_sparsifier_is_refused() -> None:
    model = cnn()
    sp = Sparsifier(model, X, adapter="filter_norm", policy=GMP)
    sp.step()
    model[6] = nn.Conv2d(8, 6, 1)
    before = snapshot(model)
    with pytest.raises(SparsifyError, match="replaced or removed after the Sparsifier was built"):
        sp.prune()
    assert_unchanged(before, model)


def test_parametrization_added_after_sparsifier_is_refused() -> None:
    model = cnn()
    sp = Sparsifier(model, X, adapter="filter_norm", policy=GMP)
    sp.step()
    weight_norm(model[3])
    before = snapshot(model)
    with pytest.raises(SparsifyError, match=r"parametrized .*after the Sparsifier was built"):
        sp.prune()
    assert_unchanged(before, model)


def test_layer_resized_after_the_graph_is_refused() -> None:
    model = cnn()
    cg = build_channel_graph(model, X)
    model[6] = nn.Conv2d(8, 5, 1)
    model[10] = nn.Linear(5, 6)
    before = snapshot(model)
    with pytest.raises(PruneError, match="model changed since the graph was built"):
        prune_channels(cg, {cg.group("6").id: [0]})
    assert_unchanged(before, model)


def test_parametrization_added_after_the_graph_is_refused() -> None:
    model = cnn()
    cg = build_channel_graph(model, X)
    spectral_norm(model[3])
    before = snapshot(model)
    with pytest.raises(PruneError, match="was not when the channel graph was built"):
        prune_channels(cg, {cg.group("0").id: [0]})
    assert_unchanged(before, model)


def test_state_dict_of_another_model_is_refused() -> None:
    a, b = cnn(), nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))
    sp_a = Sparsifier(a, X, adapter="bn_gamma", policy="str")
    sp_b = Sparsifier(b, X, adapter="bn_gamma", policy="str")
    before = snapshot(b)
    with pytest.raises(SparsifyError, match="different model"):
        sp_b.load_state_dict(sp_a.state_dict())
    assert_unchanged(before, b)


# ----- dtypes and devices -------------------------------------------------------------------------
def test_meta_model_output_check_is_refused_and_architecture_pruning_works() -> None:
    model = cnn().to("meta")
    cg = build_channel_graph(model, X.to("meta"))
    before = snapshot(model)
    with pytest.raises(PruneError, match=r"meta device.*verify_atol=None"):
        prune_channels(cg, {cg.group("0").id: [0, 1]}, verify_atol=1e-5)
    assert_unchanged(before, model)
    prune_channels(cg, {cg.group("0").id: [0, 1]})
    assert model[0].weight.shape[0] == 6 and model[1].running_mean.shape == (6,) and model[3].weight.shape[1] == 6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models_prune_to_the_same_function(dtype: torch.dtype) -> None:
    model = cnn().to(dtype)
    x = X.to(dtype)
    cg = build_channel_graph(model, x)
    with torch.no_grad():
        for i in (0, 3):
            model[i].weight[:2] = 0
            model[i].bias[:2] = 0
            model[i + 1].bias[:2] = 0
    reference = _eval_outputs(cg)[0]
    prune_channels(cg, {cg.group("0").id: [0, 1], cg.group("3").id: [0, 1]})
    model.eval()
    with torch.no_grad():
        out = model(x)
    assert out.dtype == dtype and torch.allclose(out.float(), reference.float(), atol=2e-2)


def test_export_path_prunes_batchnorm_groups_exactly() -> None:
    from sparsify.testing.oracle import check_exactness
    from sparsify.testing.rule_models import export_only

    def builder(dtype: torch.dtype = torch.float64):
        return cnn().to(dtype), X.to(dtype)

    model, x = export_only(builder)(torch.float64)
    result = check_exactness(model, x, 0.5, 0)
    assert result.groups_pruned >= 2 and result.max_abs_diff <= 1e-9 * (1 + result.output_scale)


def test_both_config_and_adapter_are_refused_untouched() -> None:
    model = cnn()
    before = snapshot(model)
    with pytest.raises(SparsifyError, match="both config= and adapter="):
        Sparsifier(model, X, adapter="filter_norm", config=SparsifierConfig(adapter="bn_gamma", policy="str"))
    assert_unchanged(before, model)


def test_str_start_is_documented_where_the_user_meets_it() -> None:
    """STR thresholds at once (not an exact identity): said in the Sparsifier's and STRConfig's docs."""
    from sparsify.policies.soft_threshold import STRConfig
    model = cnn().eval()
    with torch.no_grad():
        dense = model(X)
    Sparsifier(model, X, adapter="bn_gamma", policy="str")
    with torch.no_grad():
        moved = float((model(X) - dense).abs().max() / dense.abs().max())
    assert 0 < moved < 0.1
    assert re.search(r"outputs change", Sparsifier.__doc__) and "s_init" in (STRConfig.__doc__ or "")


def test_deep_copied_model_is_independent() -> None:
    model = cnn()
    twin = copy.deepcopy(model)
    sp = Sparsifier(model, X, adapter="filter_norm", policy=GMP)
    _soft_then_prune(sp, model)
    _soft_then_prune(Sparsifier(twin, X, adapter="filter_norm", policy=GMP), twin)  # a copy is a fresh model
    assert np.isfinite(sum(float(p.sum()) for p in twin.parameters()))
