"""Attention classes that are LLaMA's code (sparsify.hf.llama_like) get exact KV groups (issues #20, #21):
the exactness oracle on a tiny model of every listed family, and save/load/generate of pruned MoE models."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from sparsify import SparsifyError, build_channel_graph, hf  # noqa: E402
from sparsify.graph.module_types import class_has_synced_sizes  # noqa: E402
from sparsify.hf import llama_like  # noqa: E402
from sparsify.hf.families import FAMILIES  # noqa: E402
from sparsify.prune.surgery import prune_channels  # noqa: E402
from sparsify.testing.oracle import check_exactness  # noqa: E402

_KV = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128,
       "num_hidden_layers": 2}
_MOE = {"intermediate_size": 32, "moe_intermediate_size": 32, "num_experts_per_tok": 2}
_HD = {"head_dim": 16}
#: model_type → the fields of a tiny config (4 query heads, 2 KV heads, 2 layers, 4 experts where MoE)
TINY: dict[str, dict[str, Any]] = {
    "llama": {}, "mistral": {}, "qwen2": {}, "qwen3": _HD, "granite": {"attention_multiplier": 0.3},
    "mixtral": {**_MOE, "num_local_experts": 4},
    "qwen2_moe": {**_MOE, "num_experts": 4, "shared_expert_intermediate_size": 48},
    "qwen3_moe": {**_MOE, "num_experts": 4, **_HD}, "phimoe": {**_MOE, "num_local_experts": 4},
    "granitemoe": {**_MOE, "num_local_experts": 4},
    "gemma": _HD, "gemma2": {**_HD, "sliding_window": 4}, "cohere": {"use_qk_norm": True},
    "cohere2": {"sliding_window": 4}, "olmo": {"clip_qkv": 0.5}, "helium": _HD, "seed_oss": _HD,
    "ministral": _HD, "exaone4": {}, "hunyuan_v1_dense": _HD, "ernie4_5": _HD, "smollm3": {"pad_token_id": 0},
    "starcoder2": {}, "glm": {**_HD, "pad_token_id": 0}, "glm4": {**_HD, "pad_token_id": 0}, "arcee": {},
    "apertus": {}, "nemotron": {}, "dots1": {**_HD, "first_k_dense_replace": 2},
}
FAST = ["mixtral", "qwen2_moe", "cohere", "olmo", "gemma2"]
IDS = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(1))


def _has_experts(model: nn.Module) -> bool:
    return any(name.endswith(".experts") for name, _ in model.named_modules())


def tiny(model_type: str, experts: str | None = None, **overrides: Any) -> nn.Module:
    """A tiny float64 causal LM of ``model_type`` in eval mode (MoE experts: transformers' default grouped_mm,
    a barrier; ``experts="batched_mm"``: batched matmuls, whose intermediate width is a channel group)."""
    fields = {**_KV, **TINY[model_type], **overrides}
    config = transformers.AutoConfig.for_model(model_type, vocab_size=128, use_cache=False, **fields)
    torch.manual_seed(0)
    kwargs = {} if experts is None else {"experts_implementation": experts}
    return transformers.AutoModelForCausalLM.from_config(config, **kwargs).eval().double()


def _graph_then_eager(model: nn.Module) -> Any:
    """The channel graph (traced with grouped_mm experts, which have no float64 CPU kernel), then eager experts."""
    cg = build_channel_graph(model, {"input_ids": IDS})
    if _has_experts(model) and model.config._experts_implementation == "grouped_mm":
        model.set_experts_implementation("eager")
    return cg


def _check(model_type: str) -> None:
    model = tiny(model_type)
    attn = model.model.layers[0].self_attn
    listed = f"transformers.models.{llama_like.ATTENTION[model_type][0]}"
    assert f"{type(attn).__module__}.{type(attn).__name__}" == listed
    cg = _graph_then_eager(model)
    kv = [g for g in cg.groups if g.kind == "kv_group"]
    assert len(kv) == 2 and all(g.prunable and g.exact and g.width == 2 for g in kv), [g.why_not() for g in kv]
    result = check_exactness(model, {"input_ids": IDS}, graph=cg)
    assert result.groups_pruned >= 2 and result.output_scale > 0
    assert result.max_abs_diff <= 1e-10 * result.output_scale, (model_type, result.max_abs_diff)
    attn = model.model.layers[0].self_attn
    assert attn.k_proj.out_features == attn.head_dim and attn.num_key_value_groups == 2  # one KV group of 2 kept


@pytest.mark.parametrize("model_type", FAST)
def test_kv_groups_are_exact(model_type: str) -> None:
    _check(model_type)


@pytest.mark.slow
@pytest.mark.parametrize("model_type", sorted(set(llama_like.ATTENTION) - set(FAST)))
def test_kv_groups_are_exact_in_every_listed_family(model_type: str) -> None:
    _check(model_type)


def test_the_list_is_consistent() -> None:
    assert set(llama_like.DENSE_LAYERS) | set(llama_like.MOE_LAYERS) <= set(llama_like.ATTENTION) == set(TINY)
    assert not set(llama_like.DENSE_LAYERS) & set(llama_like.MOE_LAYERS)
    assert all(class_has_synced_sizes(name) for name in llama_like.attention_classes())
    assert {*llama_like.DENSE_LAYERS, *llama_like.MOE_LAYERS} <= set(FAMILIES.list())
    for unlisted in ("olmo2", "olmoe", "gpt_oss", "phi3"):  # q/k norms over all heads, per-head sinks, fused qkv
        assert unlisted not in llama_like.ATTENTION and unlisted not in FAMILIES


def test_an_unlisted_attention_keeps_its_kv_groups_refused() -> None:
    """OLMo-2 normalises q and k over all heads at once: not LLaMA's code, so its head sizes stay constants."""
    model = transformers.AutoModelForCausalLM.from_config(
        transformers.Olmo2Config(vocab_size=128, use_cache=False, **_KV)).eval().double()
    kv = [g for g in build_channel_graph(model, {"input_ids": IDS}).groups if "q_proj" in g.name]
    assert kv and not any(g.prunable and g.exact for g in kv)


# ----- save / load / generate after pruning heads ---------------------------------------------
def _prune_kv(model: nn.Module, layers: tuple[int, ...]) -> None:
    """Remove KV group 1 of the given layers (exactly: after soft-zeroing them in the model as it is)."""
    cg = _graph_then_eager(model)
    plan = {g.id: [1] for g in cg.groups if g.kind == "kv_group" and any(f"layers.{i}." in g.name for i in layers)}
    assert len(plan) == len(layers)
    prune_channels(cg, plan)


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _greedy(model: nn.Module) -> torch.Tensor:
    model.generation_config.pad_token_id = 0
    with torch.no_grad():
        return model.generate(IDS[:, :5], max_new_tokens=5, do_sample=False, use_cache=True)


def _load(path: Any, experts: str = "eager") -> nn.Module:
    return hf.from_pretrained(path, dtype=torch.float64, experts_implementation=experts).eval()


@pytest.mark.parametrize("layers", [(0, 1), (0,)], ids=["uniform", "per_layer"])
def test_mixtral_round_trip_after_pruning_kv_groups(layers: tuple[int, ...], tmp_path) -> None:
    model = tiny("mixtral")
    _prune_kv(model, layers)
    hf.save_pretrained(model, tmp_path)
    assert model.config.num_key_value_heads == (1 if layers == (0, 1) else 2)
    assert model.config.num_local_experts == 4 and model.config.intermediate_size == 32  # MoE fields untouched
    assert hasattr(model.config, "sparsify_layer_widths") == (layers == (0,))
    loaded = _load(tmp_path)
    assert [m.self_attn.k_proj.out_features for m in loaded.model.layers] == \
        [m.self_attn.k_proj.out_features for m in model.model.layers]
    assert torch.equal(_logits(loaded), _logits(model))
    assert torch.equal(_greedy(loaded), _greedy(model))


def test_mixtral_experts_width_syncs_to_the_config(tmp_path) -> None:
    """Batched-matmul experts: their intermediate width is a channel group; pruned uniformly it goes into
    config.intermediate_size and a plain AutoModelForCausalLM.from_pretrained rebuilds the model."""
    model = tiny("mixtral", experts="batched_mm")
    cg = _graph_then_eager(model)
    plan = {g.id: list(range(8)) for g in cg.prunable_groups() if g.exact and "experts" in g.name}
    assert len(plan) == 2
    prune_channels(cg, plan)
    hf.save_pretrained(model, tmp_path)
    assert model.config.intermediate_size == 24 and not hasattr(model.config, "sparsify_layer_widths")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64,
                                                               experts_implementation="batched_mm").eval()
    assert torch.equal(_logits(loaded), _logits(model))


def test_mixtral_per_layer_heads_and_experts_round_trip(tmp_path) -> None:
    """Layer 0 loses a KV group and two experts, layer 1 one expert: both per-layer records load together."""
    from sparsify.hf import experts as moe

    model = tiny("mixtral")
    _prune_kv(model, (0,))
    moe.remove_experts(model, {0: [1, 2], 1: [3]})
    hf.save_pretrained(model, tmp_path)
    assert model.config.sparsify_num_experts == {"0": 2, "1": 3} and hasattr(model.config, "sparsify_layer_widths")
    loaded = _load(tmp_path)
    assert [m.num_experts for m in moe.moe_layers(loaded)] == [2, 3]
    assert [m.self_attn.k_proj.out_features for m in loaded.model.layers] == [16, 32]
    assert torch.equal(_logits(loaded), _logits(model))


def test_qwen2_moe_shared_expert_and_heads_round_trip(tmp_path) -> None:
    model = tiny("qwen2_moe")
    cg = _graph_then_eager(model)
    plan = {g.id: list(range(0, g.width, 2)) for g in cg.groups
            if g.prunable and g.exact and (g.kind == "kv_group" or "shared_expert" in g.name)}
    assert len(plan) == 4
    prune_channels(cg, plan)
    hf.save_pretrained(model, tmp_path)
    assert model.config.shared_expert_intermediate_size == 24 and model.config.num_key_value_heads == 1
    assert model.config.moe_intermediate_size == 32 and model.config.num_experts == 4
    loaded = _load(tmp_path)
    assert torch.equal(_logits(loaded), _logits(model))


def test_a_dense_layer_among_moe_layers_is_refused_by_save(tmp_path) -> None:
    model = tiny("qwen3_moe", mlp_only_layers=[1])
    with pytest.raises(SparsifyError, match=r"layer 1 .*Qwen3MoeMLP, not a Qwen3MoeSparseMoeBlock.*sparsify\.save"):
        hf.save_pretrained(model, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("model_type", sorted({*llama_like.DENSE_LAYERS, *llama_like.MOE_LAYERS}))
def test_round_trip_per_layer(model_type: str, tmp_path) -> None:
    """Layer 0 loses a KV group, layer 1 keeps both and loses a quarter of its MLP neurons (dense MLPs; MoE: the
    experts' width, as batched matmuls, and Qwen2-MoE's shared expert): the per-layer record rebuilds it
    (Cohere: per-head q/k norms; GLM: fused gate_up_proj; StarCoder2: c_fc/c_proj)."""
    moe = model_type in llama_like.MOE_LAYERS
    model = tiny(model_type, experts="batched_mm" if moe else None)
    cg = _graph_then_eager(model)
    plan = {g.id: [1] for g in cg.groups if g.kind == "kv_group" and "layers.0." in g.name}
    mlp = [g for g in cg.prunable_groups() if g.exact and g.kind == "channel" and "layers.1." in g.name]
    assert len(mlp) == (2 if model_type == "qwen2_moe" else 1), [g.name for g in mlp]
    plan.update({g.id: list(range(g.width // 4)) for g in mlp})
    prune_channels(cg, plan)
    hf.save_pretrained(model, tmp_path)
    widths = list(model.config.sparsify_layer_widths.values())
    assert widths[0]["num_key_value_heads"] == 1 and widths[1]["num_key_value_heads"] == 2
    mlp_widths = set(widths[0]) - {"num_attention_heads", "num_key_value_heads", "head_dim"}
    assert len(mlp_widths) == len(mlp) and all(widths[1][k] == widths[0][k] * 3 // 4 for k in mlp_widths), widths
    loaded = _load(tmp_path, "batched_mm" if moe else "eager")
    assert torch.equal(_logits(loaded), _logits(model))
