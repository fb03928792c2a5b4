"""MoE experts as structures (sparsify.hf.experts): importance, physical removal, exactness, HF round trip."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from sparsify import SparsifyError, hf  # noqa: E402
from sparsify.errors import PruneError  # noqa: E402
from sparsify.hf import experts as moe  # noqa: E402

_COMMON = {"vocab_size": 128, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
           "num_key_value_heads": 2, "use_cache": False, "num_experts_per_tok": 2}
_QWEN = {"intermediate_size": 64, "moe_intermediate_size": 32}
CASES = {  # name → (config class, fields); 8 experts, top-2
    "mixtral": ("MixtralConfig", {"intermediate_size": 32, "num_local_experts": 8}),
    "qwen2_moe": ("Qwen2MoeConfig", {**_QWEN, "num_experts": 8, "shared_expert_intermediate_size": 48,
                                     "norm_topk_prob": True}),
    "qwen2_moe_unnormalised": ("Qwen2MoeConfig", {**_QWEN, "num_experts": 8, "shared_expert_intermediate_size": 48}),
    "qwen3_moe": ("Qwen3MoeConfig", {**_QWEN, "num_experts": 8, "head_dim": 16, "norm_topk_prob": True}),
    "qwen3_moe_unnormalised": ("Qwen3MoeConfig", {**_QWEN, "num_experts": 8, "head_dim": 16}),
    "olmoe": ("OlmoeConfig", {"intermediate_size": 32, "num_experts": 8, "norm_topk_prob": True}),
}
IDS = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(1))
REMOVE = {"tail": {0: [4, 5, 6, 7], 1: [4, 5, 6, 7]}, "scattered": {0: [1, 3, 4, 6], 1: [0, 2, 5, 7]}}


def tiny_moe(case: str) -> nn.Module:
    """A tiny float64 MoE causal LM (eager experts: grouped_mm has no float64 kernel on CPU)."""
    cls, fields = CASES[case]
    config = getattr(transformers, cls)(**_COMMON, **fields)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config, experts_implementation="eager").eval().double()


def silence(model: nn.Module, removed: dict[int, list[int]], margin: float) -> None:
    """Make ``removed`` experts never selected: residual coordinate 0 is ≈ 8 for every token (embedding column),
    so after RMSNorm the router input's coordinate 0 is ≈ 5.7 > 0; the removed experts' router rows are
    -margin·e0, far below the kept rows' logits (N(0, 0.5²) rows). margin=100: their exp underflows to 0."""
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb.normal_(generator=torch.Generator().manual_seed(2))
        emb[:, 0] = 8.0
        for layer in moe.moe_layers(model):
            w = layer.router.weight
            w.normal_(0, 0.5, generator=torch.Generator().manual_seed(3 + layer.index))
            w[removed[layer.index]] = 0.0
            w[removed[layer.index], 0] = -margin


def logits(model: nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


# ----- exactness oracle --------------------------------------------------------------------------
@pytest.mark.parametrize("which", sorted(REMOVE))
@pytest.mark.parametrize("case", sorted(CASES))
def test_never_selected_experts_are_removed_exactly(case: str, which: str) -> None:
    model, removed = tiny_moe(case), REMOVE[which]
    silence(model, removed, margin=100.0)
    freq = moe.expert_importance(model, [IDS], "frequency")
    assert all(float(freq[i][removed[i]].sum()) == 0.0 for i in removed)  # the oracle's premise
    before = logits(model)
    report = moe.remove_experts(model, removed)
    assert report.counts == {0: 4, 1: 4} and report.top_k == {0: 2, 1: 2}
    assert [m.num_experts for m in moe.moe_layers(model)] == [4, 4]
    assert relative(logits(model), before) <= 1e-9  # measured 0.0 for every case


@pytest.mark.parametrize("case", ["mixtral", "qwen2_moe", "qwen3_moe", "qwen2_moe_unnormalised",
                                  "qwen3_moe_unnormalised"])
def test_router_mass_of_never_selected_experts(case: str) -> None:
    """Never selected but with router mass (~1e-3): exact up to the router's float32 softmax when it
    renormalises the top-k; without renormalisation the kept experts' weights grow (inexact, reported)."""
    model, removed = tiny_moe(case), REMOVE["scattered"]
    silence(model, removed, margin=1.0)
    freq = moe.expert_importance(model, [IDS], "frequency")
    mass = moe.expert_importance(model, [IDS], "router_mass")
    assert all(float(freq[i][removed[i]].sum()) == 0.0 and float(mass[i][removed[i]].sum()) > 1e-4 for i in removed)
    before = logits(model)
    report = moe.remove_experts(model, removed)
    error = relative(logits(model), before)
    if report.renormalised[0]:
        assert error <= 1e-7  # measured 1e-9 .. 1.3e-8: HF computes the router softmax in float32
    else:
        assert error > 1e-7  # measured 2e-6 .. 4e-5


def test_renormalised_flag_follows_the_config() -> None:
    flags = {case: moe.moe_layers(tiny_moe(case))[0].renormalised for case in CASES}
    assert flags == {"mixtral": True, "qwen2_moe": True, "qwen3_moe": True, "olmoe": True,
                     "qwen2_moe_unnormalised": False, "qwen3_moe_unnormalised": False}


def test_shared_expert_is_untouched() -> None:
    model = tiny_moe("qwen2_moe")
    shared = {k: v.clone() for k, v in model.state_dict().items() if "shared_expert" in k}
    moe.remove_experts(model, {0: [0, 1], 1: [7]})
    assert all(torch.equal(model.state_dict()[k], v) for k, v in shared.items())


# ----- importance --------------------------------------------------------------------------------
def test_importance_sums() -> None:
    model, removed = tiny_moe("mixtral"), REMOVE["tail"]
    silence(model, removed, margin=100.0)
    tokens = IDS.numel()
    freq = moe.expert_importance(model, [IDS[:2], {"input_ids": IDS[2:]}], "frequency")
    mass = moe.expert_importance(model, [IDS], "router_mass")
    norm = moe.expert_importance(model, [IDS], "output_norm")
    for i in (0, 1):
        assert freq[i].shape == (8,) and float(freq[i].sum()) == tokens * 2
        assert float(mass[i].sum()) == pytest.approx(tokens)
        assert torch.all(norm[i][4:] == 0) and torch.all((norm[i][:4] > 0) == (freq[i][:4] > 0))
    with pytest.raises(SparsifyError, match="unknown method"):
        moe.expert_importance(model, [IDS], "magnitude")  # type: ignore[arg-type]


def test_output_norm_matches_the_experts_output() -> None:
    """Σ‖weighted expert outputs‖ recomputed by the hook equals the norm of the block's output for one token
    routed to one expert (top-1 block: the token's output is that expert's output)."""
    model = tiny_moe("mixtral")
    layer = moe.moe_layers(model)[0]
    hidden = torch.randn(1, 64, dtype=torch.float64)
    index, weights = torch.tensor([[3, 5]]), torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    with torch.no_grad():
        sums = moe._expert_output_norms(layer.experts, hidden, index, weights)
        out = layer.experts(hidden, index, weights)
    assert float(sums[3]) == pytest.approx(float(out.norm())) and float(sums.sum() - sums[3]) == 0.0


# ----- plans -------------------------------------------------------------------------------------
def test_plans_keep_top_k_and_hit_the_fraction() -> None:
    scores = {0: torch.tensor([5.0, 1, 4, 2, 8, 0, 3, 6]), 1: torch.tensor([1.0, 1, 1, 1, 1, 1, 50, 50])}
    top_k = {0: 2, 1: 2}
    assert moe.expert_plan(scores, top_k, 0.5) == {0: [1, 3, 5, 6], 1: [0, 1, 2, 3]}
    plan = moe.expert_plan(scores, top_k, 0.5, budget="global")
    assert sum(map(len, plan.values())) == 8 and plan[1] == [0, 1, 2, 3, 4, 5]  # layer 1's tail is ~1 % each
    assert moe.expert_plan(scores, top_k, 0.9) == {0: [0, 1, 2, 3, 5, 6], 1: [0, 1, 2, 3, 4, 5]}
    with pytest.raises(SparsifyError, match="fraction"):
        moe.expert_plan(scores, top_k, 1.0)


def test_prune_experts_global_records_per_layer_counts() -> None:
    model = tiny_moe("mixtral")
    importance = {0: torch.tensor([5.0, 1, 4, 2, 8, 0, 3, 6]), 1: torch.tensor([1.0, 1, 1, 1, 1, 1, 50, 50])}
    report = moe.prune_experts(model, importance, fraction=0.5, budget="global")
    assert report.per_layer_record and report.counts == {0: 6, 1: 2}
    assert model.config.num_local_experts == 6 and model.config.sparsify_num_experts == {"0": 6, "1": 2}
    with pytest.raises(SparsifyError, match="one vector per MoE layer"):
        moe.prune_experts(model, importance)  # sizes no longer match


# ----- misuse: atomic, clear errors ---------------------------------------------------------------
@pytest.mark.parametrize(("plan", "match"), [({5: [0]}, "not a mixture-of-experts layer"),
                                             ({0: [8]}, "experts 0..7"),
                                             ({0: [0], 1: [0, 1, 2, 3, 4, 5, 6]}, "fewer than top_k")])
def test_bad_requests_leave_the_model_untouched(plan: dict, match: str) -> None:
    model = tiny_moe("qwen3_moe")
    state, config = copy.deepcopy(model.state_dict()), model.config.to_dict()
    with pytest.raises(PruneError, match=match):
        moe.remove_experts(model, plan)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items()) and model.config.to_dict() == config
    assert [m.num_experts for m in moe.moe_layers(model)] == [8, 8]


def test_unknown_moe_layout_is_refused_by_name() -> None:
    class MyMoeBlock(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gate, self.experts = nn.Linear(4, 2), nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])

    model = nn.Module()
    model.layers = nn.ModuleList([MyMoeBlock()])
    with pytest.raises(SparsifyError, match=r"'layers\.0' is a MyMoeBlock"):
        moe.remove_experts(model, {0: [1]})
    with pytest.raises(SparsifyError, match="no mixture-of-experts layer"):
        moe.moe_layers(nn.Sequential(nn.Linear(2, 2)))


# ----- graph safety ------------------------------------------------------------------------------
def test_channel_graph_offers_no_expert_or_router_channel() -> None:
    """Data-dependent routing (topk, grouped_mm) is a barrier: no group with an expert/router member is prunable."""
    from sparsify import build_channel_graph

    cls, fields = CASES["qwen2_moe"]
    config = getattr(transformers, cls)(**_COMMON, **fields)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    graph = build_channel_graph(model, {"input_ids": IDS[:2, :8]})
    free = [g for g in graph.groups if not g.blocked]
    assert {g.kind for g in free} == {"channel", "kv_group"}  # shared-expert neurons, KV groups (LLaMA's attention)
    assert all(("shared_expert." in m.tensor) != ("self_attn." in m.tensor) for g in free for m in g.members)


# ----- Hugging Face round trip -------------------------------------------------------------------
def _greedy(model: nn.Module) -> torch.Tensor:
    model.generation_config.pad_token_id = 0
    with torch.no_grad():
        return model.generate(IDS[:2, :6], max_new_tokens=6, do_sample=False, use_cache=True)


@pytest.mark.parametrize("case", ["mixtral", "qwen2_moe"])
def test_round_trip_uniform(case: str, tmp_path) -> None:
    model = tiny_moe(case)
    report = moe.remove_experts(model, REMOVE["scattered"])
    assert not report.per_layer_record and not hasattr(model.config, moe.EXPERTS_RECORD)
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64,
                                                               experts_implementation="eager").eval()
    assert [m.num_experts for m in moe.moe_layers(loaded)] == [4, 4]
    assert torch.equal(logits(loaded), logits(model))
    assert torch.equal(_greedy(loaded), _greedy(model))


def test_round_trip_per_layer_counts(tmp_path) -> None:
    model = tiny_moe("qwen2_moe")
    report = moe.remove_experts(model, {0: [1, 3, 4, 6, 7], 1: [2]})
    assert report.per_layer_record and report.counts == {0: 3, 1: 7}
    model.save_pretrained(tmp_path)
    loaded = hf.from_pretrained(tmp_path, dtype=torch.float64, experts_implementation="eager").eval()
    assert type(loaded) is type(model) and [m.num_experts for m in moe.moe_layers(loaded)] == [3, 7]
    assert torch.equal(logits(loaded), logits(model))
    assert torch.equal(_greedy(loaded), _greedy(model))
