"""Misuse of the lifecycle and of the calls around it (resume, casts, inference_mode, hooks, tied weights,
graphs of other models, BatchNorm recalibration, load's device, the CLI): each case ends in a clear error that
names the problem and the fix with the model bit-identical to before (``assert_unchanged``), or in a correct
result."""

from __future__ import annotations

import copy
import math
import re
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsify
from sparsify import (
    Sparsifier,
    SparsifyError,
    apply_plan,
    build_channel_graph,
    make_plan,
    prune_channels,
    recalibrate_batchnorm,
)
from sparsify.cli import main
from sparsify.errors import PruneError
from sparsify.io import LoadError
from sparsify.testing.snapshot import assert_unchanged, snapshot
from tests.misuse.test_model_misuse import _soft_then_prune

GMP = {"kind": "gmp", "sparsity": 0.5, "start_step": 0, "end_step": 1}
X = torch.randn(2, 3, 8, 8)
XM = torch.randn(4, 6)


def cnn(width: int = 8) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                         nn.Conv2d(width, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 6, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 6))


def cnn_with_identity() -> nn.Sequential:
    """cnn() with the same widths and one more layer, so its groups have other names."""
    m = cnn()
    return nn.Sequential(*list(m)[:3], nn.Identity(), *list(m)[3:])


class MLP(nn.Module):
    def __init__(self, hidden: int = 8) -> None:
        super().__init__()
        self.fc1, self.bn, self.fc2 = nn.Linear(6, hidden), nn.BatchNorm1d(hidden), nn.Linear(hidden, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.bn(self.fc1(x))))


def _train_step(model: nn.Module, x: torch.Tensor = X) -> None:
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    model(x).square().mean().backward()
    opt.step()


def _same_state(a: dict[str, Any], b: dict[str, Any]) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same_state(x, y) for x, y in zip(a, b, strict=True))
    return a == b


# ----- resume: Sparsifier.load_state_dict ---------------------------------------------------------
@pytest.mark.parametrize("wrong, message", [
    ("model_state_dict", r"takes what Sparsifier\.state_dict\(\) returned.*looks like a model's state_dict"),
    ("path", r"got a str; for a file, pass torch\.load\(path\)"),
])
def test_load_state_dict_refuses_what_is_not_a_sparsifier_state(wrong: str, message: str) -> None:
    model = cnn()
    sp = Sparsifier(model, X, "filter_norm", GMP)
    state = model.state_dict() if wrong == "model_state_dict" else "sparsifier.pt"
    before, sp_before = snapshot(model), copy.deepcopy(sp.state_dict())
    with pytest.raises(SparsifyError, match=message):
        sp.load_state_dict(state)
    assert_unchanged(before, model)
    assert _same_state(sp_before, sp.state_dict())


@pytest.mark.parametrize("build, message", [
    (lambda: cnn(10), r"vector '0' \(width 8\) is '0' \(width 10\) here: it was saved from a different model"),
    (cnn_with_identity, r"vector '3' \(width 8\) is '4' \(width 8\) here: it was saved from a different model"),
])
def test_load_state_dict_from_another_architecture_with_as_many_vectors(build: Any, message: str) -> None:
    source = Sparsifier(cnn(), X, "filter_norm", GMP)
    source.step()
    model = build()
    sp = Sparsifier(model, X, "filter_norm", GMP)
    assert len(sp.vectors) == len(source.vectors)  # the count alone would let it through
    before, sp_before = snapshot(model), copy.deepcopy(sp.state_dict())
    with pytest.raises(SparsifyError, match=message):
        sp.load_state_dict(source.state_dict())
    assert_unchanged(before, model)
    assert _same_state(sp_before, sp.state_dict())


def test_load_state_dict_after_prune_is_refused() -> None:
    model = cnn()
    sp = Sparsifier(model, X, "filter_norm", GMP)
    state = copy.deepcopy(sp.state_dict())
    sp.step()
    sp.prune()
    before = snapshot(model)
    with pytest.raises(SparsifyError, match="already pruned"):
        sp.load_state_dict(state)
    assert_unchanged(before, model)
    assert sp.step_count == 1


def test_load_state_dict_failing_part_way_loads_nothing() -> None:
    model = cnn()
    sp = Sparsifier(model, X, "bn_gamma", "str")
    state = copy.deepcopy(sp.state_dict())
    with torch.no_grad():
        state["transforms"][0]["s"].fill_(3.0)  # would be loaded before the damaged last entry
    state["step_count"] = 50
    state["transforms"][-1] = {"bogus": torch.zeros(3)}
    before, sp_before = snapshot(model), copy.deepcopy(sp.state_dict())
    with pytest.raises(SparsifyError, match=r"(?s)does not fit this Sparsifier .*nothing was loaded"):
        sp.load_state_dict(state)
    assert_unchanged(before, model)
    assert _same_state(sp_before, sp.state_dict()) and sp.step_count == 0


def test_a_state_saved_without_vector_names_still_loads() -> None:
    model = cnn()
    sp = Sparsifier(model, X, "filter_norm", GMP)
    sp.step()
    state = copy.deepcopy(sp.state_dict())
    del state["vectors"]  # written by an older sparsify
    other = Sparsifier(cnn(), X, "filter_norm", GMP)
    other.load_state_dict(state)
    assert other.step_count == 1 and _same_state(sp.state_dict()["transforms"], other.state_dict()["transforms"])


# ----- what the constructor takes -----------------------------------------------------------------
@pytest.mark.parametrize("model, message", [
    (lambda x: x, r"takes the nn\.Module to sparsify first, got a function"),
    (MLP, r"got the class MLP; pass the model instance itself"),
])
def test_sparsifier_takes_a_module_instance(model: Any, message: str) -> None:
    with pytest.raises(SparsifyError, match=message):
        Sparsifier(model, XM, "filter_norm", GMP)


@pytest.mark.parametrize("config, message", [
    ("recipe.yaml", r"config must be a SparsifierConfig, got str: .*SparsifierConfig\.from_yaml\('recipe\.yaml'\)"),
    ({"adapter": "filter_norm", "policy": GMP}, r"got dict: build it with config=SparsifierConfig\(\*\*config\)"),
])
def test_config_that_is_not_a_sparsifier_config(config: Any, message: str) -> None:
    model = cnn()
    before = snapshot(model)
    with pytest.raises(SparsifyError, match=message):
        Sparsifier(model, X, config=config)
    assert_unchanged(before, model)


# ----- the model moved or cast after the graph / Sparsifier was built -----------------------------
def _prune_refused_until_undone(sp: Sparsifier, model: nn.Module, match: str, undo: Any) -> None:
    """prune() refuses (``match``) and leaves the model as it was; after ``undo()`` it prunes exactly."""
    before = snapshot(model)
    with pytest.raises(SparsifyError, match=match):
        sp.prune()
    assert_unchanged(before, model)
    undo()
    _soft_then_prune(sp, model)


def test_model_cast_between_construction_and_prune_is_refused_then_works_cast_back() -> None:
    model = cnn()
    sp = Sparsifier(model, X, "filter_norm", GMP)
    sp.step()
    model.double()
    _prune_refused_until_undone(sp, model, r"moved or cast after the Sparsifier was built .*float64.*model\.to",
                                undo=model.float)


def test_prune_channels_on_a_model_cast_after_the_graph_names_the_fix() -> None:
    model = cnn()
    cg = build_channel_graph(model, X)
    model.half()
    before = snapshot(model)
    with pytest.raises(PruneError, match=r"example inputs the graph was built with \(float32 on cpu\).*float16 on cpu"
                                         r".*rebuild the graph"):
        prune_channels(cg, {cg.group("0").id: [0, 1]}, verify_atol=1e-3)
    assert_unchanged(before, model)


@pytest.mark.parametrize("verify_atol", [-1.0, math.nan, "1e-5", True])
def test_verify_atol_must_be_a_tolerance(verify_atol: Any) -> None:
    model = MLP()
    cg = build_channel_graph(model, XM)
    before = snapshot(model)
    with pytest.raises(PruneError, match=r"verify_atol must be a finite number ≥ 0 .* or None"):
        prune_channels(cg, {"fc1": [0]}, verify_atol=verify_atol)
    assert_unchanged(before, model)
    assert not cg.stale


# ----- inference_mode -----------------------------------------------------------------------------
def test_sparsifier_built_and_pruned_inside_inference_mode_leaves_a_trainable_model() -> None:
    model = cnn()
    with torch.inference_mode():
        sp = Sparsifier(model, X, "filter_norm", GMP)
    sp.step()  # the masks are normal tensors: updated in place outside inference_mode
    with torch.inference_mode():
        sp.prune()
    assert not any(t.is_inference() for t in [*model.parameters(), *model.buffers()])
    _train_step(model)


def test_prune_channels_inside_inference_mode_leaves_a_trainable_model() -> None:
    model = cnn()
    cg = build_channel_graph(model, X)
    with torch.inference_mode():
        prune_channels(cg, {cg.group("0").id: [0, 1]})
    assert model[0].out_channels == 6 and not any(p.is_inference() for p in model.parameters())
    _train_step(model)


# ----- forward hooks: opaque to the graph ---------------------------------------------------------
def _flip(module: nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor:
    return out.flip(1)  # reorders the channels: pruning through it unchecked removed the wrong ones


def test_prune_channels_refuses_a_model_with_forward_hooks() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1))
    model[0].register_forward_hook(_flip)
    cg = build_channel_graph(model, X)
    before = snapshot(model)
    with pytest.raises(PruneError, match=r"carry forward hooks \('0' \(_flip\)\).*handle\.remove\(\)"):
        prune_channels(cg, {cg.prunable_groups()[0].id: [0, 1]})
    assert_unchanged(before, model)


def test_deprecated_hook_based_weight_norm_is_refused_with_its_own_fix() -> None:
    model = cnn()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch deprecates the hook-based weight_norm
        torch.nn.utils.weight_norm(model[3])
    before = snapshot(model)
    with pytest.raises(SparsifyError, match=r"'3' carry the deprecated hook-based weight_norm.*remove_weight_norm"):
        Sparsifier(model, X, "filter_norm", GMP)
    assert_unchanged(before, model)
    torch.nn.utils.remove_weight_norm(model[3])
    _soft_then_prune(Sparsifier(model, X, "filter_norm", GMP), model)


def test_a_function_instead_of_a_model_is_refused_with_the_fix() -> None:
    with pytest.raises(SparsifyError, match=r"expected an nn.Module, got builtin_.*: .*wrap it in an nn.Module"):
        build_channel_graph(torch.relu, X)


def test_sparsifier_refuses_forward_hooks_at_construction_and_at_prune() -> None:
    model = cnn()
    handle = model[3].register_forward_pre_hook(lambda m, args: None)
    before = snapshot(model)
    with pytest.raises(SparsifyError, match=r"Sparsifier: submodules of the model carry forward hooks \('3'"):
        Sparsifier(model, X, "filter_norm", GMP)
    assert_unchanged(before, model)
    handle.remove()
    sp = Sparsifier(model, X, "filter_norm", GMP)
    sp.step()
    handle = model[0].register_forward_hook(_flip)  # added during training
    _prune_refused_until_undone(sp, model, r"prune\(\): submodules of the model carry forward hooks",
                                undo=handle.remove)


def test_transformers_output_capturing_hooks_are_allowed() -> None:
    """transformers 5 installs its output-capturing hooks on a model's layers the first time hidden states are
    asked for; they only record, so a Hugging Face model that has returned hidden states still sparsifies."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=64)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 64, (1, 8))
    model(ids, output_hidden_states=True)
    hooks = [fn for m in model.modules() for fn in m._forward_hooks.values()]
    assert hooks and all(fn.__module__ == "transformers.utils.output_capturing" for fn in hooks)
    sp = Sparsifier(model, {"input_ids": ids}, "filter_norm", GMP)
    sp.step()
    assert sp.prune().model is model


# ----- tied and shared weights --------------------------------------------------------------------
class Tied(nn.Module):
    """l2 shares l1's weight (another module): a mask installed on l1 would not reach l2."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.l0, self.l1, self.l2 = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.l2.weight = self.l1.weight
        self.mid, self.head = nn.Linear(8, 5), nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.l2(F.relu(self.l1(F.relu(self.l0(x))))))
        return self.head(F.relu(self.mid(h)))


def test_tied_weights_are_left_out_of_the_sparsifier_and_the_rest_prunes_exactly() -> None:
    model = Tied()
    sp = Sparsifier(model, XM, "filter_norm", GMP)
    assert any("tied weights" in why and "l2.weight" in why for why in sp.adapter.skipped.values())
    assert [g.name for g in sp.groups] == ["mid"]
    _soft_then_prune(sp, model, XM)
    assert model.l1.weight is model.l2.weight and model.mid.out_features < 5


def test_only_tied_weights_to_prune_is_refused_naming_the_tie() -> None:
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(),
                          nn.Linear(8, 3))
    model[4].weight = model[2].weight
    before = snapshot(model)
    with pytest.raises(SparsifyError, match=r"tied weights: Linear\.weight is also 4\.weight.*untie them"):
        Sparsifier(model, XM, "filter_norm", GMP)
    assert_unchanged(before, model)


def test_a_module_applied_twice_prunes_exactly() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.a, self.b, self.c = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.c(F.relu(self.b(F.relu(self.b(F.relu(self.a(x)))))))

    model = Twice()
    _soft_then_prune(Sparsifier(model, X, "filter_norm", GMP), model)


# ----- one-shot plans and graphs of other models --------------------------------------------------
def test_make_plan_and_apply_plan_refuse_another_models_graph() -> None:
    model, other = MLP(), MLP()
    cg = build_channel_graph(other, XM)
    plan = make_plan(model, XM, 0.5, unit="channels")
    before, other_before = snapshot(model), snapshot(other)
    with pytest.raises(SparsifyError, match=r"graph= was built on another model .*pass the graph of this model"):
        make_plan(model, XM, 0.5, graph=cg)
    with pytest.raises(SparsifyError, match=r"graph= was built on another model"):
        apply_plan(model, XM, plan, graph=cg)  # used to prune `other` and return success
    assert_unchanged(before, model)
    assert_unchanged(other_before, other)


@pytest.mark.parametrize("sparsity", ["0.5", None, True])
def test_make_plan_sparsity_must_be_a_number(sparsity: Any) -> None:
    with pytest.raises(SparsifyError, match=r"sparsity must be a number in \[0, 1\) .*e\.g\. 0\.5"):
        make_plan(MLP(), XM, sparsity)


def test_an_optimizer_over_two_models_is_sliced_for_this_one() -> None:
    model, critic = cnn(), nn.Linear(6, 1)
    sp = Sparsifier(model, X, "filter_norm", GMP)
    opt = torch.optim.SGD([{"params": model.parameters()}, {"params": critic.parameters(), "lr": 0.01}], lr=0.1,
                          momentum=0.9)
    (model(X).sum() + critic(XM).sum()).backward()
    opt.step()
    critic_before = snapshot(critic)
    sp.step()
    sp.prune(optimizer=opt)
    assert_unchanged(critic_before, critic)
    opt.zero_grad()
    model(X).sum().backward()
    opt.step()  # momentum buffers fit the pruned parameters


# ----- recalibrate_batchnorm ----------------------------------------------------------------------
def _trained_bn() -> nn.Sequential:
    model = cnn().train()
    with torch.no_grad():
        model(X)
    model[4].eval()  # one layer frozen by the user: its mode must survive
    return model.eval()


@pytest.mark.parametrize("batches, kwargs, message", [
    ([(X, torch.zeros(2))], {}, r"failed on batch 0 \(a \(input, target\) pair\? pass \(x for x, _ in loader\)\)"),
    (X, {}, r"is one tensor of shape \(2, 3, 8, 8\); iterating it would feed its rows one by one"),
    ([X], {"max_batches": -1}, r"max_batches must be a positive int or None"),
    ([X], {"max_batches": 0}, r"max_batches must be a positive int or None"),
    ([X], {"max_batches": "2"}, r"max_batches must be a positive int or None"),
    ([X, torch.randn(2, 5, 8, 8)], {}, r"failed on batch 1: RuntimeError.*statistics were put back"),
    ([torch.randn(1, 3, 1, 1)], {}, r"failed on batch 0: ValueError: Expected more than 1 value per channel"),
])
def test_recalibrate_batchnorm_bad_batches_leave_the_statistics(batches: Any, kwargs: dict[str, Any],
                                                                  message: str) -> None:
    model = _trained_bn()
    before = snapshot(model)
    with pytest.raises(SparsifyError, match=message):
        recalibrate_batchnorm(model, batches, **kwargs)
    assert_unchanged(before, model)


def test_recalibrate_batchnorm_keeps_every_layers_mode() -> None:
    model = cnn().train()
    model[4].eval()
    assert recalibrate_batchnorm(model, [X, X]) == 2
    assert model.training and not model[4].training and model[1].training


# ----- load's device, and the CLI -----------------------------------------------------------------
def test_load_refuses_a_device_that_is_not_one(tmp_path: Path) -> None:
    model = MLP()
    report = prune_channels(build_channel_graph(model, XM), {"fc1": [1, 5]})
    sparsify.save(model, tmp_path, report, XM)
    with pytest.raises(LoadError, match=r"device='gpu0' is not a torch device .*'cuda:0'"):
        sparsify.load(MLP, tmp_path, device="gpu0")


@pytest.mark.parametrize("argv, message", [
    (["inspect", "mlp_block", "--input-shape", "1,3,abc"], r"'1,3,abc' is not a shape"),
    (["demo", "--epochs", "-1", "--quick"], r"--epochs: must be ≥ 1, got -1"),
    (["demo", "--threads", "x", "--quick"], r"--threads: 'x' is not an integer"),
])
def test_cli_bad_numbers_are_usage_errors(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert re.search(message, capsys.readouterr().err)


@pytest.mark.parametrize("spec, message", [
    ("no_such_package_xyz.models:build", r"cannot import 'no_such_package_xyz\.models'.*PYTHONPATH"),
    ("sparsify:no_such_builder", r"sparsify has no function 'no_such_builder'"),
    ("sparsify:__version__", r"has no function '__version__' \(it is a str\)"),
])
def test_cli_inspect_builder_that_is_not_one(spec: str, message: str) -> None:
    with pytest.raises(SystemExit, match=message):
        main(["inspect", spec])


def test_cli_a_sparsify_error_is_a_message_not_a_traceback() -> None:
    with pytest.raises(SystemExit, match=r"^sparsify inspect: running the traced graph on example_inputs failed"):
        main(["inspect", "mlp_block", "--input-shape", "1,3,8"])
