"""The coverage zoo (benchmarks.coverage): a fast sample of timm and Hugging Face families is exact, refusals
name the op, a hung family is recorded, and the report states the totals against the goals. The whole zoo
is a benchmark (docs/results/coverage.md): it takes hours on 2 cores, beyond CI's slow-suite budget."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from benchmarks import coverage, coverage_models, coverage_report

pytest.importorskip("torch_pruning")


@pytest.mark.parametrize("suite,family", [("timm", "cspnext"), ("hf", "llama"), ("hf", "bert")])
def test_sample_families_prune_exactly(suite: str, family: str) -> None:
    pytest.importorskip("timm" if suite == "timm" else "transformers")
    rec = coverage.check_family(suite, family, torch_pruning=suite == "timm")
    assert rec["result"] == "exact", rec
    assert rec["exact"] >= 1 and rec["pruned_groups"] >= 1
    assert rec["rel_error"] <= coverage.REL_TOL
    if suite == "timm":
        import timm

        with torch.device("meta"):  # the smallest variant, not just any
            larger = sum(p.numel() for p in timm.create_model("cspnext_s").parameters())
        assert rec["params"] < larger and rec["model"].startswith("cspnext")
        assert set(rec["torch_pruning"]) >= {"builds", "prunes", "runs"}
    if family == "llama":  # a decoder: use_cache on is checked too, and a non-exact outcome says why
        cache = rec["use_cache"]
        assert cache["result"] == "exact", cache  # DynamicCache is a pytree node (sparsify.hf.cache)


class _Cumsum(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.cumsum(self.a(x), dim=-1))


def test_a_refusal_names_the_op_not_the_model_input() -> None:
    model = _Cumsum().double()
    rec = coverage.check_ours((model, torch.randn(2, 4, dtype=torch.float64), []))
    assert rec["result"] == "refused" and rec["exact"] == 0
    assert "cumsum" in rec["reason"] and "register_op_rule" in rec["reason"], rec["reason"]


class _ScalarBiasBeforePaddedConv(nn.Module):
    """hgnetv2's learnable affine block: a scalar bias after the activation makes removed channels emit
    a constant, which the next (padded) convolution cannot absorb."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 3, padding=1)
        self.bias = nn.Parameter(torch.tensor([0.5]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)) + self.bias)


def test_a_constant_the_next_layer_cannot_absorb_is_inexact_at_prune_not_a_pass() -> None:
    model = _ScalarBiasBeforePaddedConv().double()
    rec = coverage.check_ours((model, torch.randn(1, 3, 6, 6, dtype=torch.float64), []))
    assert rec["result"] == "inexact at prune" and "'b' pads its input" in rec["reason"], rec


def test_shrink_overrides_only_fields_the_config_has() -> None:
    d = coverage_models._shrink({"hidden_size": 768, "vocab_size": 50257, "pad_token_id": 50256, "foo": 12,
                                 "max_position_embeddings": 32, "use_bias": True, "layer_types": ["a"] * 12,
                                 "text_config": {"model_type": "t", "num_hidden_layers": 12, "hidden_sizes": [8]}})
    assert d["hidden_size"] == 64 and d["vocab_size"] == 128 and d["foo"] == 12 and d["use_bias"] is True
    assert d["max_position_embeddings"] == 32  # max_* only shrink
    assert d["pad_token_id"] < 128 and d["layer_types"] == ["a", "a"]
    assert d["text_config"]["num_hidden_layers"] == 2 and d["text_config"]["hidden_sizes"] == [8]
    assert "num_attention_heads" not in d


def test_a_family_past_its_time_limit_is_recorded_as_timeout() -> None:
    rec = coverage.run_child("timm", "resnet", timeout=0.5, torch_pruning=False)
    assert rec == {"family": "resnet", "result": "timeout", "reason": "no result within 0 s"}


def test_report_states_totals_against_the_goals(tmp_path) -> None:
    models = {"a": {"family": "a", "model": "a_tiny", "groups": 3, "exact": 2, "rel_error": 1e-16, "result": "exact",
                    "torch_pruning": {"builds": True, "prunes": True, "runs": False, "error": "RuntimeError: x"}},
              "b": {"family": "b", "result": "refused", "reason": "no op rule for cumsum() | at node"},
              "c": {"family": "c", "result": "not built", "reason": "no inputs"}}
    totals = coverage.totals(models)
    assert totals["built"] == 2 and totals["exact_share_of_built"] == 0.5 and totals["oracle_failures"] == 0
    assert totals["torch_pruning"] == {"builds": 1, "prunes": 1, "runs": 0}
    machine = dict.fromkeys(("platform", "cpus", "torch", "timm", "transformers", "torchvision", "torch-pruning"), "?")
    (tmp_path / "coverage_timm.json").write_text(json.dumps(
        {"command": "c", "date": "d", "machine": machine, "totals": totals, "models": models}))
    page = coverage_report.render(tmp_path)
    assert "1 prune with at least one exact group = 50.0% of those that build (goal ≥ 95%: not met)" in page
    assert "| timm | a | a_tiny | 3 | 2 | 1.0e-16 | exact | yes / yes / no (RuntimeError: x) | not checked |" in page
    assert "**refused**: no op rule for cumsum() \\| at node" in page
    assert "* **hf**: not run yet" in page


def test_shrink_cuts_every_per_layer_list_and_drops_backbone_stages() -> None:
    d = coverage_models._shrink({"num_hidden_layers": 12, "mlp_layer_types": ["dense"] * 12, "head_dim": 64,
                                 "out_features": ["stage12"], "per_layer_config": {"1": {"a": 1}, "5": {"a": 2}},
                                 "rope_parameters": {"mrope_section": [24, 20, 20]}})
    assert d["mlp_layer_types"] == ["dense", "dense"] and d["out_features"] is None
    assert d["per_layer_config"] == {"1": {"a": 1}}
    assert sum(d["rope_parameters"]["mrope_section"]) == d["head_dim"] // 2 == 8


def test_every_layer_type_keeps_one_layer_of_each_type_and_per_layer_sizes_follow() -> None:
    hybrid = {"num_hidden_layers": 32, "layer_types": ["linear", "linear", "linear", "full"] * 8,
              "mlp_layer_types": ["dense"] * 32, "intermediate_size": [4096] * 32,
              "text_config": {"model_type": "t", "num_hidden_layers": 6, "layer_types": ["a", "b", "c"] * 2}}
    assert coverage_models._shrink(hybrid)["layer_types"] == ["linear", "linear"]  # the first attempt: a prefix
    d = coverage_models._shrink(hybrid, every_layer_type=True)
    assert d["num_hidden_layers"] == 2 and d["layer_types"] == ["linear", "full"]
    assert d["mlp_layer_types"] == ["dense", "dense"] and d["intermediate_size"] == [128, 128]
    text = d["text_config"]
    assert text["num_hidden_layers"] == 3 and text["layer_types"] == ["a", "b", "c"]
    assert coverage_models._shrink(hybrid, layers=False, every_layer_type=True)["num_hidden_layers"] == 32


def test_a_sub_model_type_is_built_with_its_own_model_class() -> None:
    pytest.importorskip("transformers")
    task, cls = coverage_models.hf_model_class(coverage_models.hf_config("clap_text_model"))
    assert (task, cls.__name__) == ("model", "ClapTextModel")


class _UnfoldableThenFoldable(_ScalarBiasBeforePaddedConv):
    """Group 'a' feeds a padded conv through a scalar bias (its pruning is refused); group 'b' feeds a 1×1 conv."""

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.relu(super().forward(x)))


def test_groups_whose_constants_cannot_be_folded_are_left_out_and_the_rest_pruned_exactly() -> None:
    model = _UnfoldableThenFoldable().double()
    rec = coverage.check_ours((model, torch.randn(1, 3, 6, 6, dtype=torch.float64), []))
    assert rec["result"] == "exact" and rec["refused_at_prune"] == ["a"], rec
    assert rec["pruned_groups"] == 1 and model.b.out_channels == 2 and model.a.out_channels == 8
    assert rec["rel_error"] <= coverage.REL_TOL


def test_a_parameter_dim_no_rule_declares_is_not_the_first_reason() -> None:
    class Group:
        def __init__(self, reason: str) -> None:
            self.members, self.blocked, self.inexact = [type("M", (), {"role": "out"})()], [reason], []

    cg = type("CG", (), {"groups": [Group("parameter 'e.weight' dim 0 is read by 'embedding'"),
                                    Group("reshape at node 'r' hard-codes the size 4")]})()
    assert coverage.refusal_reasons(cg)[0].startswith("reshape")


def test_a_timm_family_beyond_the_parameter_cap_is_not_built(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("timm")
    from benchmarks import coverage_vision

    monkeypatch.setattr(coverage_vision, "timm_smallest", lambda family: ("huge_vit", 412_000_000))
    with pytest.raises(coverage_models.NotBuilt, match="huge_vit has 412M parameters, beyond the zoo's 300M cap"):
        coverage_vision.build_timm("huge")
