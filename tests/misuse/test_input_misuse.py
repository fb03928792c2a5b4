"""Misuse of what a user passes in (plans, files, configs, example inputs, optimizers): each case either
raises a clear error that names the problem and the fix, with the model, optimizer and files untouched,
or gives a correct result (issue #17, the input side)."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from rich.console import Console
from torch import nn

import sparsify
from sparsify import GMPConfig, Sparsifier, SparsifierConfig, SparsifyError, build_channel_graph, prune_channels
from sparsify.adapters.bn_gamma import BNGammaConfig
from sparsify.errors import PruneError, TraceError
from sparsify.io import LoadError
from sparsify.measure.progress import progress
from sparsify.oneshot import GroupPlan, WidthPlan, apply_plan, make_plan
from sparsify.policies.soft_threshold import STRConfig

X = torch.randn(4, 6)


class MLP(nn.Module):
    def __init__(self, hidden: int = 8) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, hidden)
        self.bn = nn.BatchNorm1d(hidden)
        self.fc2 = nn.Linear(hidden, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.bn(self.fc1(x))))


def _model() -> nn.Module:
    torch.manual_seed(0)
    return MLP().eval()


class Frozen:
    """Bit-for-bit record of a model's tensors (and their objects), module attributes and optimizer state."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
        self.model, self.optimizer = model, optimizer
        self.state = self._state()

    def _state(self) -> Any:
        tensors = {k: (id(v), v.detach().clone()) for k, v in
                   [*self.model.named_parameters(remove_duplicate=False), *self.model.named_buffers()]}
        attrs = {n: {k: v for k, v in vars(m).items() if not k.startswith("_") and not isinstance(v, torch.Tensor)}
                 for n, m in self.model.named_modules()}
        opt = None
        if self.optimizer is not None:
            opt = ([[id(p) for p in g["params"]] for g in self.optimizer.param_groups],
                   {id(p): {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in s.items()}
                    for p, s in self.optimizer.state.items()})
        return tensors, attrs, opt

    def unchanged(self) -> bool:
        (t0, a0, o0), (t1, a1, o1) = self.state, self._state()
        same_tensors = t0.keys() == t1.keys() and all(
            t0[k][0] == t1[k][0] and torch.equal(t0[k][1], t1[k][1]) for k in t0)
        same_opt = o0 is None or (o0[0] == o1[0] and o0[1].keys() == o1[1].keys() and all(
            torch.equal(v, o1[1][p][k]) if isinstance(v, torch.Tensor) else v == o1[1][p][k]
            for p, s in o0[1].items() for k, v in s.items()))
        return same_tensors and a0 == a1 and same_opt


def _files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())} if path.exists() else {}


def _with_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.train()
    F.mse_loss(model(X), torch.zeros(4, 3)).backward()
    opt.step()
    model.eval()
    return opt


# ----- removal plans for prune_channels -------------------------------------------------------------

BAD_VALUES = {
    "numpy bool mask": (np.array([True, False] * 4), r"boolean mask .*np\.flatnonzero\(mask\)"),
    "list bool mask": ([True, False, True, False, False, False, False, False], r"boolean mask .*np\.flatnonzero"),
    "torch bool mask": (torch.tensor([True] + [False] * 7), r"boolean mask .*np\.flatnonzero"),
    "float list": ([1.0, 2.0], r"contains 1\.0 \(float\).*must be ints"),
    "float numpy": (np.array([1.5, 2.0]), r"dtype float64; structure indices must be integers"),
    "float tensor": (torch.tensor([1.0]), r"dtype float32; structure indices must be integers"),
    "string": ("0,1", r"is str .*list of ints"),
    "None": (None, r"is NoneType .*list of ints"),
    "nested list": ([[0, 1]], r"contains \[0, 1\] \(list\).*nested lists"),
    "2-D array": (np.array([[0], [1]]), r"shape \(2, 1\); give a flat"),
    "single int": (3, r"single number 3; give a list of indices, e.g. \[3\]"),
    "negative index": ([-1], r"indices outside \[0, 8\): \[-1\]"),
    "index past the width": ([2, 8], r"indices outside \[0, 8\): \[8\]"),
    "duplicates": ([1, 1, 2], r"lists indices \[1\] more than once.*np\.unique"),
    "bools and ints": ([True, 2], r"mixes booleans and ints"),
    "a dict": ({0: 1}, r"is dict"),
    "every structure": (list(range(8)), r"removing all 8 structures .* keep at least one"),
}


@pytest.mark.parametrize("case", list(BAD_VALUES))
def test_bad_plan_values_are_refused_before_anything_changes(case: str) -> None:
    model = _model()
    opt = _with_optimizer(model)
    frozen = Frozen(model, opt)
    cg = build_channel_graph(model, X)
    value, message = BAD_VALUES[case]
    with pytest.raises(PruneError, match=message) as info:
        prune_channels(cg, {"fc1": value}, optimizer=opt)
    assert "fc1" in str(info.value) or case == "every structure"
    assert frozen.unchanged() and not cg.stale


BAD_KEYS = {
    "unknown name": ({"fc9": [0]}, r"channel group 'fc9', which this graph does not have; its groups are"),
    "unknown id": ({99: [0]}, r"channel group 99, which this graph does not have"),
    "bool key": ({True: [0]}, r"plan key True \(bool\) is not a channel group id"),
    "float key": ({0.0: [0]}, r"plan key 0\.0 \(float\)"),
    "same group twice": (None, r"names group 'fc1' twice"),
}


@pytest.mark.parametrize("case", list(BAD_KEYS))
def test_bad_plan_keys_are_refused(case: str) -> None:
    model = _model()
    frozen = Frozen(model)
    cg = build_channel_graph(model, X)
    plan, message = BAD_KEYS[case]
    if plan is None:
        g = cg.group("fc1")
        plan = {g.id: [0], g.name: [1]}
    with pytest.raises(PruneError, match=message):
        prune_channels(cg, plan)
    assert frozen.unchanged()


def test_a_plan_that_is_not_a_dict_and_a_graph_that_is_not_a_graph() -> None:
    model = _model()
    frozen = Frozen(model)
    cg = build_channel_graph(model, X)
    with pytest.raises(PruneError, match=r"plan must be a dict \{group id or name: structure indices\}, got list"):
        prune_channels(cg, [0, 1])
    with pytest.raises(PruneError, match=r"takes a ChannelGraph .*got MLP"):
        prune_channels(model, {"fc1": [0]})
    assert frozen.unchanged()


def test_an_optimizer_that_is_not_an_optimizer() -> None:
    model = _model()
    frozen = Frozen(model)
    cg = build_channel_graph(model, X)
    with pytest.raises(PruneError, match=r"optimizer must be a torch\.optim\.Optimizer .* got str"):
        prune_channels(cg, {"fc1": [0]}, optimizer="sgd")
    assert frozen.unchanged()


@pytest.mark.parametrize("value", [np.array([1, 4]), torch.tensor([1, 4]), {4, 1}, (1, 4), range(1, 5, 3),
                                   [np.int64(1), np.int32(4)], np.array([4, 1], dtype=np.uint8)])
def test_integer_indices_of_every_common_type_remove_exactly_those(value: Any) -> None:
    model, reference = _model(), _model()
    cg = build_channel_graph(model, X)
    report = prune_channels(cg, {"fc1": value})
    assert report.plan["fc1"] == [1, 4] and model.fc1.out_features == 6
    keep = [0, 2, 3, 5, 6, 7]
    assert torch.equal(model.fc1.weight, reference.fc1.weight[keep])


def test_a_mask_passed_as_its_flatnonzero_is_what_the_message_promises() -> None:
    model = _model()
    mask = np.zeros(8, dtype=bool)
    mask[[2, 5]] = True
    cg = build_channel_graph(model, X)
    assert prune_channels(cg, {"fc1": np.flatnonzero(mask)}).plan["fc1"] == [2, 5]


def test_an_empty_entry_prunes_nothing() -> None:
    model = _model()
    frozen = Frozen(model)
    report = prune_channels(build_channel_graph(model, X), {"fc1": []})
    assert report.removed == {} and frozen.unchanged()


# ----- width plans and apply_plan ------------------------------------------------------------------


def _plan(model: nn.Module) -> WidthPlan:
    return make_plan(model, X, 0.5, unit="channels")


def test_group_plan_keep_larger_than_width_is_refused() -> None:
    with pytest.raises(ValidationError, match=r"group 'fc1' keeps 9 structures but has only 8"):
        GroupPlan(name="fc1", width=8, keep=9)


def test_width_plan_with_a_group_twice_is_refused() -> None:
    plan = _plan(_model())
    data = plan.model_dump()
    data["groups"] = data["groups"] * 2
    with pytest.raises(ValidationError, match=r"lists groups \['fc1'\] more than once"):
        WidthPlan.model_validate(data)


@pytest.mark.parametrize("kwargs, message", [
    ({"plan": {"fc1": [0]}}, r"takes a WidthPlan .*got dict.*removal plan: prune it with sparsify\.prune_channels"),
    ({"match": "nearest"}, r"match must be 'auto', 'ratio' or 'count', got 'nearest'"),
    ({"round_to": 0}, r"round_to must be a positive int"),
    ({"round_to": True}, r"round_to must be a positive int"),
    ({"importance": "magnitud"}, r"unknown importance 'magnitud'; use an adapter kind"),
])
def test_apply_plan_refuses_bad_arguments_without_touching_the_model(kwargs: dict[str, Any], message: str) -> None:
    model = _model()
    frozen = Frozen(model)
    args = {"plan": _plan(model), **kwargs}
    with pytest.raises(SparsifyError, match=message):
        apply_plan(model, X, **args)
    assert frozen.unchanged()


def test_width_plan_from_a_missing_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(SparsifyError, match=r"'.*nowhere\.json' is neither JSON text nor an existing file"):
        WidthPlan.from_json(tmp_path / "nowhere.json")


# ----- save and load --------------------------------------------------------------------------------


def _pruned() -> tuple[nn.Module, Any]:
    model = _model()
    report = prune_channels(build_channel_graph(model, X), {"fc1": [1, 5]})
    return model, report


def test_save_refuses_a_model_with_live_sparsifier_masks(tmp_path: Path) -> None:
    old, old_report = _pruned()
    sparsify.save(old, tmp_path, old_report, X)
    before = _files(tmp_path)
    model = _model()
    Sparsifier(model, X, "bn_gamma", GMPConfig(sparsity=0.5, end_step=1, update_every=1))
    with pytest.raises(SparsifyError, match=r"still carry parametrizations.*sparsifier\.prune\(\) first"):
        sparsify.save(model, tmp_path, [], X)
    assert _files(tmp_path) == before


def test_save_refuses_reports_that_miss_a_prune(tmp_path: Path) -> None:
    model, _ = _pruned()
    with pytest.raises(SparsifyError, match=r"pruned 1 time\(s\) in this process.*0 report\(s\).*reports=None"):
        sparsify.save(model, tmp_path / "out", [], X)
    assert not (tmp_path / "out").exists()


def test_save_refuses_reports_of_another_model(tmp_path: Path) -> None:
    model, _ = _pruned()
    other = _model()
    other_report = prune_channels(build_channel_graph(other, X), {"fc1": [0, 1, 2]})
    with pytest.raises(SparsifyError, match=r"do not match those prunes"):
        sparsify.save(model, tmp_path, other_report, X)
    copied = copy.deepcopy(model)  # not pruned in this process: the widths speak
    with pytest.raises(SparsifyError, match=r"leave channel group 'fc1' at width 5, but the model has 6"):
        sparsify.save(copied, tmp_path, other_report, X)
    assert _files(tmp_path) == {}


def test_save_with_build_fn_replays_on_a_meta_copy(tmp_path: Path) -> None:
    model, report = _pruned()
    copied = copy.deepcopy(model)
    with pytest.raises(SparsifyError, match=r"replaying the reports on build_fn's architecture gives 'bn\.bias' "
                                            r"\(8,\), but the model has \(6,\)"):
        sparsify.save(copied, tmp_path, [], X, build_fn=MLP)
    assert _files(tmp_path) == {}
    sparsify.save(copied, tmp_path, report, X, build_fn=MLP)
    assert torch.equal(sparsify.load(MLP, tmp_path).fc1.weight, model.fc1.weight)


def test_save_with_reports_none_uses_the_recorded_prunes_and_resaves_a_loaded_model(tmp_path: Path) -> None:
    model, _ = _pruned()
    sparsify.save(model, tmp_path / "a", None, X)
    loaded = sparsify.load(MLP, tmp_path / "a")
    sparsify.save(loaded, tmp_path / "b", None, X)
    again = sparsify.load(MLP, tmp_path / "b")
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in model.state_dict().items())


def test_a_flipped_byte_in_the_weights_is_caught_by_the_checksum(tmp_path: Path) -> None:
    model, report = _pruned()
    sparsify.save(model, tmp_path, report, X)
    data = bytearray((tmp_path / "model.safetensors").read_bytes())
    data[-3] ^= 0x01  # inside the last tensor's bytes
    (tmp_path / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(LoadError, match=r"'[\w.]+' in .* does not match the sha256 recorded"):
        sparsify.load(MLP, tmp_path)


def test_records_without_checksums_still_load(tmp_path: Path) -> None:
    model, report = _pruned()
    sparsify.save(model, tmp_path, report, X)
    record = json.loads((tmp_path / "plan.json").read_text())
    assert len(record["checksums"]) == len(model.state_dict())
    del record["checksums"]
    (tmp_path / "plan.json").write_text(json.dumps(record))
    assert torch.equal(sparsify.load(MLP, tmp_path).fc2.weight, model.fc2.weight)


@pytest.mark.parametrize("build_fn, message", [
    (MLP(), r"build_fn must be a function that builds the original model .*not a MLP instance"),
    ("MLP", r"build_fn must be a function returning the original nn\.Module, got str"),
    (lambda: {"fc1": 1}, r"build_fn\(\) returned dict, not an nn\.Module"),
])
def test_load_checks_build_fn(tmp_path: Path, build_fn: Any, message: str) -> None:
    model, report = _pruned()
    sparsify.save(model, tmp_path, report, X)
    before = _files(tmp_path)
    with pytest.raises(LoadError, match=message):
        sparsify.load(build_fn, tmp_path)
    assert _files(tmp_path) == before


def test_damaged_or_foreign_record_files(tmp_path: Path) -> None:
    model, report = _pruned()
    sparsify.save(model, tmp_path, report, X)
    text = (tmp_path / "plan.json").read_text()
    (tmp_path / "plan.json").write_text(text[:-10])
    with pytest.raises(LoadError, match=r"plan\.json is not valid JSON.*damaged"):
        sparsify.load(MLP, tmp_path)
    record = json.loads(text)
    record["steps"][0]["removed"]["fc1"] = [1.0, 5.0]
    (tmp_path / "plan.json").write_text(json.dumps(record))
    with pytest.raises(LoadError, match=r"not a valid sparsify prune record"):
        sparsify.load(MLP, tmp_path)
    record = json.loads(text) | {"format_version": 99}
    (tmp_path / "plan.json").write_text(json.dumps(record))
    with pytest.raises(LoadError, match=r"format_version 99, newer than this sparsify reads"):
        sparsify.load(MLP, tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 7)
    (tmp_path / "plan.json").write_text(text)
    with pytest.raises(LoadError, match=r"model\.safetensors could not be read .*damaged"):
        sparsify.load(MLP, tmp_path)


def test_save_paths_and_inputs_of_the_wrong_kind(tmp_path: Path) -> None:
    model, report = _pruned()
    (tmp_path / "file").write_text("x")
    with pytest.raises(SparsifyError, match=r"is a file; give a directory path"):
        sparsify.save(model, tmp_path / "file", report, X)
    with pytest.raises(SparsifyError, match=r"takes PruneReports or Sparsifier PruneResults, got dict"):
        sparsify.save(model, tmp_path / "d", {"fc1": [1, 5]}, X)
    with pytest.raises(SparsifyError, match=r"input 0 is a int; save\(\) can only record tensor example inputs"):
        sparsify.save(model, tmp_path / "d", report, [1, 2])
    with pytest.raises(SparsifyError, match=r"takes the pruned nn\.Module first"):
        sparsify.save(report, tmp_path / "d", report, X)
    with pytest.raises(LoadError, match=r"path must be a str or Path"):
        sparsify.load(MLP, 3)
    assert (tmp_path / "file").read_text() == "x" and not (tmp_path / "d").exists()


def test_save_refuses_a_meta_model(tmp_path: Path) -> None:
    with torch.device("meta"):
        model = MLP()
    with pytest.raises(SparsifyError, match=r"on the meta device and has no values"):
        sparsify.save(model, tmp_path, [], torch.zeros(4, 6, device="meta"))
    assert _files(tmp_path) == {}


# ----- configs --------------------------------------------------------------------------------------


@pytest.mark.parametrize("build, field", [
    (lambda: STRConfig(s_init=math.nan), "s_init"),
    (lambda: STRConfig(threshold_decay=math.inf), "threshold_decay"),
    (lambda: GMPConfig(sparsity=math.nan), "sparsity"),
    (lambda: GMPConfig(latency_importance_weight=math.inf), "latency_importance_weight"),
    (lambda: BNGammaConfig(min_gamma=math.inf), "min_gamma"),
    (lambda: SparsifierConfig(adapter="bn_gamma", policy="str", verify_atol=math.nan), "verify_atol"),
    (lambda: SparsifierConfig(adapter="bn_gamma", policy={"kind": "str", "s_init": "nan"}), "s_init"),
])
def test_non_finite_floats_are_refused_with_the_field_name(build: Any, field: str) -> None:
    with pytest.raises(ValidationError, match=rf"{field}\n.*finite number"):
        build()


@pytest.mark.parametrize("build, field", [
    (lambda: GMPConfig(end_step=True), "end_step"),
    (lambda: STRConfig(control_every=True), "control_every"),
    (lambda: SparsifierConfig(adapter="bn_gamma", policy="str", verify_atol=False), "verify_atol"),
])
def test_booleans_are_not_numbers(build: Any, field: str) -> None:
    with pytest.raises(ValidationError, match=rf"{field}=(True|False): a boolean is not a number"):
        build()


def test_boolean_fields_still_take_booleans() -> None:
    assert BNGammaConfig(reparametrize_bias=False).reparametrize_bias is False


def test_from_yaml_names_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SparsifyError, match=r"'missing\.yaml' is not an existing file"):
        SparsifierConfig.from_yaml("missing.yaml")
    with pytest.raises(SparsifyError, match=r"nowhere\.yaml' is not an existing file"):
        SparsifierConfig.from_yaml(tmp_path / "nowhere.yaml")


@pytest.mark.parametrize("text, message", [
    ("- adapter\n- policy\n", r"holds a list, not a mapping; a config needs 'adapter:' and 'policy:'"),
    ("adapter: [bn_gamma\n", r"is not valid YAML"),
    ("", r"holds a NoneType, not a mapping"),
])
def test_from_yaml_refuses_text_that_is_no_config(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(SparsifyError, match=message):
        SparsifierConfig.from_yaml(text if text else "\n")
    file = tmp_path / "recipe.yaml"
    file.write_text(text)
    with pytest.raises(SparsifyError, match=r"recipe\.yaml"):
        SparsifierConfig.from_yaml(file)


def test_from_yaml_takes_only_text_or_paths() -> None:
    with pytest.raises(SparsifyError, match=r"takes YAML text or a path, got dict"):
        SparsifierConfig.from_yaml({"adapter": "bn_gamma"})


@pytest.mark.parametrize("adapter, policy, message", [
    ("bn_gama", "str", r"unknown adapter kind 'bn_gama'.*bn_gamma"),
    ({"p": 1}, "str", r"adapter config needs a 'kind'"),
    ("bn_gamma", {"kind": "gmp", "sparsity": 0.5, "speed": 2}, r"speed\n.*Extra inputs are not permitted"),
    ("bn_gamma", 3, r"policy must be a kind string, a dict with 'kind', or a config object"),
])
def test_adapter_and_policy_names_and_dicts(adapter: Any, policy: Any, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        SparsifierConfig(adapter=adapter, policy=policy)


# ----- example inputs and tracing ---------------------------------------------------------------------


class Optional2(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        if extra is not None:
            x = x + extra
        return self.fc(x)


def test_forward_with_an_optional_argument_names_it() -> None:
    with pytest.raises(TraceError, match=r"forward\(\)'s 'extra' got no value from example_inputs, so the default "
                                         r"was used.*Pass them in example_inputs"):
        build_channel_graph(Optional2(), X)


def test_forward_with_the_optional_argument_given_works() -> None:
    cg = build_channel_graph(Optional2(), {"x": X, "extra": torch.zeros(4, 6)})
    assert cg.group("fc").width == 4


@pytest.mark.parametrize("inputs, message", [
    ({"x": X, "extr": X}, r"keyword 'extr', which forward\(x, extra\) does not take"),
    ((X, X, X), r"3 positional inputs, but forward\(x, extra\) takes 2"),
    (3, r"example_inputs must be a tensor, a tuple of positional inputs or a dict of keyword inputs, not int"),
])
def test_example_inputs_that_do_not_fit_forward(inputs: Any, message: str) -> None:
    model = Optional2()
    frozen = Frozen(model)
    with pytest.raises(TraceError, match=message):
        build_channel_graph(model, inputs)
    assert frozen.unchanged()


def test_a_wrong_input_shape_names_the_layer_and_the_shapes() -> None:
    model = _model()
    with pytest.raises(TraceError, match=r"(?s)at call_module 'fc1' with input shapes \[\(4, 5\)\].*"
                                         r"example_inputs: \(4, 5\) float32"):
        build_channel_graph(model, torch.randn(4, 5))


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) if x.sum() > 0 else -self.fc(x)


def test_a_failed_trace_does_not_print_the_export_graph(capfd: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(TraceError, match=r"could not trace DataDependent"):
        build_channel_graph(DataDependent(), X)
    assert "def forward" not in capfd.readouterr().err


# ----- progress ------------------------------------------------------------------------------------------


def test_progress_is_silent_off_a_terminal(capfd: pytest.CaptureFixture[str]) -> None:
    assert list(progress(range(3), "counting")) == [0, 1, 2]
    from sparsify.measure import width_latency_table

    table = width_latency_table("linear", widths=[8, 16], batch=2, tokens=2, iters=1, warmup=0, candidates=[8])
    assert set(table.ms) == {8, 16}
    captured = capfd.readouterr()
    assert captured.err == "" and captured.out == ""


def test_progress_draws_a_bar_on_a_terminal() -> None:
    console = Console(force_terminal=True, record=True, width=80)
    assert list(progress([1, 2], "counting", console=console)) == [1, 2]
    assert "counting" in console.export_text()
