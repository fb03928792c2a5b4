"""MACs of the attention products (Q·Kᵀ and A·V of scaled_dot_product_attention) in sparsify.graph.cost:
counted by ``module_macs``, keyed by the q / v projections, scaled by ``MacsModel`` as heads or head_dim
slots go, and hit by a GMP ``unit="macs"`` target."""

from __future__ import annotations

import copy
import importlib
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsify import GMPConfig, Sparsifier, build_channel_graph, prune_channels
from sparsify.graph.channel_graph import ChannelGraph
from sparsify.graph.cost import MacsModel, is_weight_key, module_macs, product_weight, structure_costs
from sparsify.graph.trace import trace
from sparsify.measure.latency_model import LatencyModel, LayerSpec
from sparsify.nn import ExplicitMultiheadAttention
from sparsify.testing.oracle import randomize_, soft_zero_

E, HEADS, L = 32, 4, 10
TOL = 1e-9


class Encoder(nn.Module):
    """A transformer block: nn.MultiheadAttention swapped for the explicit module, then an MLP."""

    def __init__(self, tokens: int = L, mlp: int = 24) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.attn = ExplicitMultiheadAttention(nn.MultiheadAttention(E, HEADS, batch_first=True))
        self.mlp = nn.Sequential(nn.Linear(E, mlp), nn.GELU(), nn.Linear(mlp, E))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(x, x, x)[0]
        return x + self.mlp(x)


class GQA(nn.Module):
    """Grouped-query attention, q and v of different widths (4 query heads of 8, 2 KV heads of 6 value
    slots): KV heads repeated by ``[:, :, None].expand().reshape()`` or SDPA's ``enable_gqa``."""

    def __init__(self, repeat: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.repeat = repeat
        self.q, self.k, self.v = nn.Linear(24, 32), nn.Linear(24, 16), nn.Linear(24, 12)
        self.o = nn.Linear(24, 24)

    def _kv(self, t: torch.Tensor, d: int) -> torch.Tensor:
        b, s, _ = t.shape
        t = t.view(b, s, -1, d).transpose(1, 2)
        n = t.shape[1]
        return t[:, :, None].expand(b, n, 2, s, d).reshape(b, n * 2, s, d) if self.repeat else t

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.q(x).view(b, s, -1, 8).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, self._kv(self.k(x), 8), self._kv(self.v(x), 6), scale=8 ** -0.5,
                                           enable_gqa=not self.repeat)
        return self.o(y.transpose(1, 2).reshape(b, s, -1))


class Squashed(nn.Module):
    """q passes a tanh (not a shape op) on its way to SDPA: its projection is not assumed."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(16, 16) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = (t.view(b, s, -1, 8).transpose(1, 2) for t in (torch.tanh(self.q(x)), self.k(x), self.v(x)))
        return self.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, s, -1))


def _keep(cg: ChannelGraph, plan: dict[int, Any]) -> dict[int, np.ndarray]:
    keep = {}
    for gid, removed in plan.items():
        keep[gid] = np.ones(cg.group(gid).width, dtype=bool)
        keep[gid][np.asarray(removed)] = False
    return keep


def _check_plan(model: nn.Module, x: Any, plan_of: Any) -> tuple[dict[str, int], dict[str, int]]:
    """Prune ``plan_of(cg)`` exactly (soft zeros, then surgery checked in float64) and compare every
    ``module_macs`` entry of the pruned model with what ``MacsModel`` predicted for it alone."""
    cg = build_channel_graph(model, x)
    macs = module_macs(cg.traced)
    plan = plan_of(cg)
    keep = _keep(cg, plan)
    predicted = {k: MacsModel(cg, {k: v}).after(keep) for k, v in macs.items()}
    total = MacsModel(cg, macs).after(keep)
    soft_zero_(model, cg.groups, plan)
    prune_channels(cg, plan, verify_atol=TOL)  # the soft model's outputs, exactly
    after = module_macs(trace(model, x))
    assert set(after) == set(macs)
    for k, v in after.items():
        assert predicted[k] == pytest.approx(v, rel=1e-12), k
    assert total == pytest.approx(sum(after.values()), rel=1e-12)
    return macs, after


# ----- counting -----------------------------------------------------------------------------------------
def test_explicit_attention_counts_projections_and_both_products() -> None:
    model, x = Encoder().double(), torch.randn(2, L, E, dtype=torch.float64)
    macs = module_macs(build_channel_graph(model, x).traced)
    products = {k: v for k, v in macs.items() if not is_weight_key(k)}
    assert products == {"attn.q_proj.weight@out": L * L * E, "attn.v_proj.weight@out": L * L * E}
    assert [product_weight(k) for k in products] == ["attn.q_proj.weight", "attn.v_proj.weight"]
    assert product_weight("attn.q_proj.weight") is None
    assert sum(macs.values()) == 4 * L * E * E + 2 * L * L * E + 2 * L * E * 24


def test_unknown_op_on_the_way_makes_the_product_fixed() -> None:
    model, x = Squashed().double(), torch.randn(2, 5, 16, dtype=torch.float64)
    cg = build_channel_graph(model, x)
    macs = module_macs(cg.traced)
    products = {k: v for k, v in macs.items() if not is_weight_key(k)}
    assert products == {"scaled_dot_product_attention@qk": 5 * 5 * 16, "v.weight@out": 5 * 5 * 16}
    heads = next(g for g in cg.groups if g.kind == "head")
    keep = {heads.id: np.array([True, False])}
    assert MacsModel(cg, {"scaled_dot_product_attention@qk": 400}).after(keep) == 400  # fixed
    assert MacsModel(cg, {"v.weight@out": 400}).after(keep) == 200


def test_first_order_costs_and_latency_model_see_only_weights() -> None:
    model, x = Encoder().double(), torch.randn(2, L, E, dtype=torch.float64)
    cg = build_channel_graph(model, x)
    heads = next(g for g in cg.groups if g.kind == "head")
    _, flops = structure_costs(cg, heads)
    hd = E // HEADS  # per head: q/k/v rows and out_proj columns (L·E·hd each), both products (L²·hd each)
    assert flops.tolist() == [4 * L * E * hd + 2 * L * L * hd] * HEADS

    def ms(spec: LayerSpec, in_w: int, out_w: int) -> float:
        return spec.macs_at(in_w, out_w) * 1e-6

    lat = LatencyModel(cg, step=8, latency_fn=ms)
    assert all(is_weight_key(s.name) for s in lat.layers) and len(lat.layers) == 6


# ----- MacsModel = the pruned model's count ---------------------------------------------------------------
def test_removing_heads_scales_both_products() -> None:
    model, x = randomize_(Encoder().double()), torch.randn(2, L, E, dtype=torch.float64)

    def plan(cg: ChannelGraph) -> dict[int, Any]:
        heads = next(g for g in cg.groups if g.kind == "head")
        mlp = next(g for g in cg.groups if any(m.tensor == "mlp.0.weight" and m.dim == 0 for m in g.members))
        return {heads.id: [1, 3], mlp.id: [0, 5, 7]}

    _, after = _check_plan(model, x, plan)
    assert after["attn.q_proj.weight@out"] == after["attn.v_proj.weight@out"] == L * L * E // 2
    assert model.attn.num_heads == 2


@pytest.mark.parametrize("repeat", [True, False], ids=["repeat_kv", "enable_gqa"])
def test_grouped_query_attention_with_other_v_width(repeat: bool) -> None:
    model, x = randomize_(GQA(repeat).double()), torch.randn(2, 5, 24, dtype=torch.float64)
    macs, after = _check_plan(model, x, lambda cg: {next(g for g in cg.groups if g.kind == "kv_group").id: [0]})
    assert macs["q.weight@out"] == 4 * 5 * 5 * 8 and macs["v.weight@out"] == 4 * 5 * 5 * 6  # Hq·L²·D
    assert after["q.weight@out"] * 2 == macs["q.weight@out"] and after["v.weight@out"] * 2 == macs["v.weight@out"]


def _llama(kv_heads: int) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=kv_heads, vocab_size=100, use_cache=False, pad_token_id=0)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval().double()


IDS = {"input_ids": torch.randint(1, 100, (2, 8), generator=torch.Generator().manual_seed(1))}


def test_llama_kv_groups_through_rotary_and_repeat_kv() -> None:
    model = _llama(2)

    def plan(cg: ChannelGraph) -> dict[int, Any]:
        groups = [g for g in cg.groups if g.kind == "kv_group"]
        assert len(groups) == 2
        return {groups[0].id: [1]}

    macs, after = _check_plan(model, IDS, plan)
    q0, v0 = "model.layers.0.self_attn.q_proj.weight@out", "model.layers.0.self_attn.v_proj.weight@out"
    assert is_weight_key(product_weight(q0)) and all(is_weight_key(k) or product_weight(k) for k in macs)
    assert macs[q0] == macs[v0] == 4 * 8 * 8 * 16 and after[q0] == after[v0] == macs[q0] // 2
    assert after["model.layers.1.self_attn.q_proj.weight@out"] == macs[q0]


def test_llama_head_dim_slots_scale_qk_and_av_separately() -> None:
    from sparsify import hf

    model = hf.explicit_attention_(_llama(2))

    def plan(cg: ChannelGraph) -> dict[int, Any]:
        groups = [g for g in cg.prunable_groups() if g.kind == "head_dim"]
        assert [g.width for g in groups] == [8, 16] * 2  # per layer: q/k rotary pairs, v/o slots
        return {groups[0].id: [1, 5], groups[1].id: [0, 3, 9], groups[2].id: [0, 2, 3, 7]}

    macs, after = _check_plan(model, IDS, plan)
    q0, v0 = "model.layers.0.self_attn.q_proj.weight@out", "model.layers.0.self_attn.v_proj.weight@out"
    assert after[q0] == macs[q0] * 12 // 16 and after[v0] == macs[v0] * 13 // 16  # head_dim 12, v_head_dim 13
    assert after["model.layers.1.self_attn.q_proj.weight@out"] == macs[q0] // 2


# ----- a MACs target with heads ------------------------------------------------------------------------
class TinyViT(nn.Module):
    """Patches (4×4 conv) → 2 encoder blocks with explicit attention (64 tokens: the products are half of the
    attention's MACs) → mean → classifier."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.patch = nn.Conv2d(3, E, 4, 4)
        self.blocks = nn.Sequential(Encoder(64), Encoder(64))
        self.head = nn.Linear(E, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.patch(x).flatten(2).transpose(1, 2)).mean(1))


@pytest.mark.parametrize("target", [0.2, 0.35])
def test_gmp_macs_target_with_heads_is_met_within_one_head(target: float) -> None:
    model, x = TinyViT().double(), torch.randn(2, 3, 32, 32, dtype=torch.float64)
    sp = Sparsifier(model, x, adapter="heads",
                    policy=GMPConfig(sparsity=target, unit="macs", start_step=0, end_step=1, update_every=1))
    total = sum(module_macs(trace(copy.deepcopy(model), x)).values())
    assert sp.macs_model.total == total and total > 2 * (4 * 64 * E * E)  # the products are in it
    sp.step()
    planned = sp.macs_model.after(sp.policy.keep_vectors())
    with torch.no_grad():
        soft = model(x)
    result = sp.prune()
    with torch.no_grad():
        assert (model(x) - soft).abs().max() <= TOL
    assert result.macs_before == total and result.macs_after == pytest.approx(planned, rel=1e-12)
    one_head = 4 * 64 * E * (E // HEADS) + 2 * 64 * 64 * (E // HEADS)  # the largest structure's MACs
    removed = 1 - result.macs_after / result.macs_before
    assert target <= removed < target + one_head / total, (removed, one_head / total)
    assert [b.attn.num_heads for b in model.blocks] != [HEADS, HEADS]


# ----- benchmarks/speed.py: its MAC counts with the products in module_macs ---------------------------------
class Mixed(nn.Module):
    """One nn.MultiheadAttention (a leaf: the benchmark counts it) and one explicit attention."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.leaf = nn.MultiheadAttention(E, HEADS, batch_first=True)
        self.block = Encoder()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x + self.leaf(x, x, x, need_weights=False)[0])


def test_speed_benchmark_counts_each_attention_once() -> None:
    pytest.importorskip("torch_pruning")
    bench = importlib.import_module("benchmarks.speed_lib.models")
    dense, x = Mixed().double().eval(), torch.randn(2, L, E, dtype=torch.float64)
    leaf = 4 * L * E * E + 2 * L * L * E
    assert bench.attention_macs(dense, x) == leaf  # the explicit block's products are module_macs' now
    explicit = 4 * L * E * E + 2 * L * L * E + 2 * L * E * 24
    assert bench.macs(dense, x) == leaf + explicit
    counter = bench.WeightMacs(dense, x)
    pruned = copy.deepcopy(dense)
    cg = build_channel_graph(pruned, x)
    heads = next(g for g in cg.groups if g.kind == "head")
    prune_channels(cg, {heads.id: [0, 2, 3]})
    assert pruned.block.attn.num_heads == 1
    assert counter.reduction(pruned) == pytest.approx(bench.macs(dense, x) / bench.macs(pruned, x), rel=1e-12)
    assert bench.macs(pruned, x) == leaf + explicit - 3 * (4 * L * E * 8 + 2 * L * L * 8)
