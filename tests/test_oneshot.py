"""Width plans made on the meta device (no weights), applied to real models of the same family."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from sparsify import SparsifyError, build_channel_graph
from sparsify.errors import PruneError
from sparsify.oneshot import WidthPlan, apply_plan, make_plan
from sparsify.prune.surgery import prune_channels
from sparsify.testing.oracle import soft_zero_

transformers = pytest.importorskip("transformers")


def _llama(hidden: int, mlp: int, layers: int = 2, device: str = "cpu") -> torch.nn.Module:
    config = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=100, use_cache=False)
    torch.manual_seed(0)
    with torch.device(device):
        return transformers.LlamaForCausalLM(config).eval()


def _ids(device: str = "cpu") -> dict[str, torch.Tensor]:
    if device == "meta":
        return {"input_ids": torch.zeros(1, 8, dtype=torch.long, device="meta")}
    return {"input_ids": torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(1))}


@pytest.fixture(scope="module")
def meta_graph():
    model = _llama(256, 688, device="meta")
    return model, build_channel_graph(model, _ids("meta"))


def test_meta_trace_and_plan_read_no_values(meta_graph) -> None:
    model, cg = meta_graph
    assert all(p.is_meta for p in model.parameters())
    mlp = [g for g in cg.prunable_groups() if "mlp" in g.name]
    assert len(mlp) == 2 and all(g.exact and g.width == 688 for g in mlp)
    plan = make_plan(model, None, 0.5, unit="params", graph=cg, kinds={"channel"})
    assert [g.name for g in plan.groups] == [g.name for g in mlp]  # the inexact hidden group is left out
    assert all(g.keep == 344 for g in plan.groups)
    assert plan.params["removed"] == pytest.approx(0.5 * plan.params["in_groups"], rel=1e-3)
    every = make_plan(model, None, 0.5, unit="params", graph=cg)  # heads too, where they are prunable
    assert {g.name for g in every.groups} == {g.name for g in cg.prunable_groups() if g.exact}
    assert {g.kind for g in every.groups} <= {"channel", "head", "kv_group"}
    assert plan.macs["total"] > 0 and plan.macs["removed"] > 0
    assert WidthPlan.from_json(plan.to_json()) == plan
    assert json.loads(plan.to_json())["groups"][0]["kind"] == "channel"
    with_hidden = make_plan(model, None, 0.5, unit="channels", include_inexact=True, graph=cg, kinds={"channel"})
    assert len(with_hidden.groups) == 3 and not with_hidden.groups[0].exact


def test_plan_rounds_widths_up_to_a_multiple(meta_graph) -> None:
    model, cg = meta_graph
    plain = make_plan(model, None, 0.37, unit="params", graph=cg, kinds={"channel"})
    rounded = make_plan(model, None, 0.37, unit="params", graph=cg, kinds={"channel"}, round_to=64)
    assert [g.keep for g in plain.groups] == [433, 433]  # 688 · 0.63: falls off the fast bf16 GEMM shapes
    assert [g.keep for g in rounded.groups] == [448, 448]  # rounded up, never down
    assert rounded.params["removed"] < plain.params["removed"]
    assert make_plan(model, None, 0.37, unit="params", graph=cg, kinds={"channel"}, round_to=1) == plain


def test_erk_plan_meets_the_param_budget(meta_graph) -> None:
    model, cg = meta_graph
    plan = make_plan(model, None, 0.3, unit="params", budget="erk", include_inexact=True, graph=cg,
                     kinds={"channel"})
    assert plan.params["removed"] >= 0.3 * plan.params["in_groups"] * (1 - 1e-6)
    assert plan.params["removed"] <= 0.36 * plan.params["in_groups"]
    keep = {g.name: g.ratio for g in plan.groups}
    assert len(set(np.round(list(keep.values()), 3))) > 1  # ERK is not uniform across differently shaped groups
    with pytest.raises(SparsifyError, match="global"):
        make_plan(model, None, 0.3, budget="global", graph=cg)  # type: ignore[arg-type]


def test_meta_architecture_prune_and_value_guards(meta_graph) -> None:
    model, _ = meta_graph
    model = copy.deepcopy(model)
    ids = _ids("meta")
    plan = make_plan(model, ids, 0.25, kinds={"channel"})
    before = sum(p.numel() for p in model.parameters())
    with pytest.raises(SparsifyError, match="meta device"):
        apply_plan(model, ids, plan, importance="filter_norm")
    cg = build_channel_graph(model, ids)
    with pytest.raises(PruneError, match="meta device"):
        prune_channels(cg, {plan.groups[0].name: [0]}, verify_atol=1e-3)
    assert sum(p.numel() for p in model.parameters()) == before  # refused before any change
    result = apply_plan(model, ids, plan, importance="index", graph=cg)
    assert model.model.layers[0].mlp.down_proj.in_features == 516
    assert before - sum(p.numel() for p in model.parameters()) == pytest.approx(plan.params["removed"])
    assert all(np.array_equal(s, np.arange(516, 688)) for s in result.removed.values())


@pytest.mark.parametrize("importance", ["filter_norm", "activation"])
def test_plan_from_meta_applies_to_a_small_real_llama_exactly(meta_graph, importance: str) -> None:
    meta, cg_meta = meta_graph
    plan = WidthPlan.from_json(make_plan(meta, None, 0.5, graph=cg_meta, unit="channels").to_json())
    model = _llama(64, 128).double()
    reference = copy.deepcopy(model)
    ids = _ids()
    cg = build_channel_graph(model, ids)
    calibration = [_ids(), {"input_ids": torch.randint(0, 100, (3, 5))}]
    with pytest.raises(SparsifyError, match="match='ratio'"):
        apply_plan(model, ids, plan, match="count", graph=cg)
    result = apply_plan(model, ids, plan, importance=importance, graph=cg, calibration=calibration)
    assert result.keep == {g.name: 64 if g.kind == "channel" else g.keep for g in plan.groups}
    assert model.model.layers[1].mlp.up_proj.out_features == 64
    # exactness: the pruned model equals the original with the removed structures zeroed
    removal = {g.id: result.removed[g.name] for g in cg.groups if g.name in result.removed}
    soft_zero_(reference, cg.groups, removal)
    with torch.no_grad():
        diff = (reference(**ids).logits - model(**ids).logits).abs().max().item()
    assert diff <= 1e-10


def test_apply_plan_refuses_a_plan_for_another_model_and_leaves_it_unchanged(meta_graph) -> None:
    meta, cg_meta = meta_graph
    plan = make_plan(meta, None, 0.5, graph=cg_meta)
    model = _llama(64, 128, layers=1)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(SparsifyError, match="does not have"):
        apply_plan(model, _ids(), plan)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


@pytest.mark.slow
def test_llama_7b_shape_plans_on_meta_and_prunes_its_architecture() -> None:
    config = transformers.LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                      num_attention_heads=32, num_key_value_heads=8, vocab_size=32000, use_cache=False)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config).eval()
    ids = {"input_ids": torch.zeros(1, 8, dtype=torch.long, device="meta")}
    cg = build_channel_graph(model, ids)
    plan = make_plan(model, ids, 0.5, unit="params", graph=cg)
    mlp = [g for g in plan.groups if g.kind == "channel"]
    assert len(mlp) == 32 and all(g.width == 11008 and g.keep == 5504 for g in mlp)
    before = sum(p.numel() for p in model.parameters())
    apply_plan(model, ids, plan, importance="index", graph=cg)
    assert model.model.layers[31].mlp.down_proj.in_features == 5504
    assert before - sum(p.numel() for p in model.parameters()) == pytest.approx(plan.params["removed"])
