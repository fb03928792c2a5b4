"""Hugging Face models go through the torch.export front end (fx cannot trace them)."""

from __future__ import annotations

import pytest
import torch

from sparsify import build_channel_graph
from sparsify.hf.families import FAMILIES, register_family
from sparsify.testing.oracle import check_exactness

transformers = pytest.importorskip("transformers")


def _llama() -> torch.nn.Module:
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=100, use_cache=False)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval().double()


def test_llama_mlp_groups_are_prunable_and_exact() -> None:
    model, ids = _llama(), {"input_ids": torch.randint(0, 100, (2, 8))}
    cg = build_channel_graph(model, ids)
    mlp = [g for g in cg.prunable_groups() if "mlp.gate_proj" in g.name]
    assert len(mlp) == 2 and all(g.exact and g.width == 128 for g in mlp)
    members = {m.tensor for m in mlp[0].members}
    assert {"model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.down_proj.weight"} <= members
    hidden = cg.group("model.embed_tokens (+9)")
    assert hidden.prunable and not hidden.exact and "mean" in hidden.inexact[0]
    heads = [g for g in cg.groups if "q_proj" in g.name]  # one group of 2 KV groups per layer (rules/test_attention)
    assert len(heads) == 2 and all(g.prunable and g.exact and g.kind == "kv_group" and g.width == 2 for g in heads)
    result = check_exactness(model, ids)
    assert result.groups_pruned == 4 and result.max_abs_diff <= 1e-10
    assert model.model.layers[0].self_attn.k_proj.out_features == 16  # one of the two KV heads (head_dim 16)
    assert model.model.layers[0].mlp.gate_proj.out_features == 64
    assert model.model.layers[0].mlp.down_proj.in_features == 64


def test_families_registry_explains_and_refuses_duplicates() -> None:
    assert {"bert", "gpt2", "llama"} <= set(FAMILIES.list())
    with pytest.raises(KeyError, match=r"unknown model family kind 'phi3'.*'gpt2'.*register_family"):
        FAMILIES.get("phi3")
    with pytest.raises(ValueError, match=r"already registered.*override=True"):
        register_family("gpt2", FAMILIES.get("bert"))
    with pytest.raises(TypeError, match=r"must be a sparsify\.hf\.Family"):
        register_family("my-model", object())
