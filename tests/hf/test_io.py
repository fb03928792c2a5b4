"""Pruned Hugging Face models: config synced with the weights, save_pretrained → from_pretrained, generate()."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors import safe_open
from torch import nn

from sparsify import Sparsifier, SparsifyError, STRConfig, build_channel_graph, hf, prune_channels
from sparsify.io import LoadError
from sparsify.testing.oracle import soft_zero_

transformers = pytest.importorskip("transformers")

IDS = {"input_ids": torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(1))}


def _llama(**kw: Any) -> nn.Module:
    config = transformers.LlamaConfig(**{
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 100, "use_cache": False, "pad_token_id": 0, **kw})
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval().double()


def _gpt2() -> nn.Module:
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=32,
                                     use_cache=False, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).eval().double()


def _bert() -> nn.Module:
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, vocab_size=100, max_position_embeddings=32)
    torch.manual_seed(0)
    return transformers.BertForMaskedLM(config).eval().double()


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(**IDS).logits


_MLP_WEIGHTS = ("mlp.gate_proj.weight", "mlp.c_fc.weight", "intermediate.dense.weight")


def _mlp_groups(cg: Any) -> list[Any]:
    """One group per layer: the MLP's intermediate neurons."""
    return [g for g in cg.prunable_groups()
            if any(m.role == "out" and m.tensor.endswith(_MLP_WEIGHTS) for m in g.members)]


def _head_groups(model: nn.Module) -> list[Any]:
    return [g for g in build_channel_graph(model, IDS).prunable_groups() if g.kind in ("head", "kv_group")]


def _prune(model: nn.Module, fractions: list[float], hidden: int = 0, heads: dict[int, list[int]] | None = None
           ) -> None:
    """Zero then remove ``fractions[i]`` of layer i's MLP neurons (exact: outputs unchanged), ``hidden``
    residual channels (inexact), and the given head structures of the head groups (by group order)."""
    cg = build_channel_graph(model, IDS)
    mlp = _mlp_groups(cg)
    assert len(mlp) == len(fractions), [g.name for g in mlp]
    rng = np.random.default_rng(0)
    plan = {g.id: np.sort(rng.choice(g.width, round(g.width * f), replace=False))
            for g, f in zip(mlp, fractions, strict=True) if round(g.width * f)}
    head_groups = [g for g in cg.prunable_groups() if g.kind in ("head", "kv_group")]
    for i, structures in (heads or {}).items():
        plan[head_groups[i].id] = np.asarray(structures)
    soft_zero_(model, cg.groups, plan)
    before = _logits(model)
    if hidden:
        res = next(g for g in cg.prunable_groups() if any(m.tensor.endswith("embeddings.weight") or m.tensor.endswith(
            ("embed_tokens.weight", "wte.weight")) for m in g.members))
        plan[res.id] = np.sort(rng.choice(res.width, hidden, replace=False))
    prune_channels(cg, plan, allow_inexact=True)
    if not hidden:
        assert (before - _logits(model)).abs().max() <= 1e-10


def _round_trip(model: nn.Module, path: Path, load: Callable[[Path], nn.Module] = hf.from_pretrained) -> nn.Module:
    expected = _logits(model)
    hf.save_pretrained(model, path)
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
    assert not [k for k in keys if "parametrizations" in k or "original" in k]
    loaded = load(path).eval()
    assert loaded.dtype == torch.float64
    assert torch.equal(_logits(loaded), expected)
    state, loaded_state = model.state_dict(), loaded.state_dict()
    assert state.keys() == loaded_state.keys()
    assert all(torch.equal(state[k], loaded_state[k]) for k in state)
    assert hf.layer_widths(loaded) == hf.layer_widths(model)
    return loaded


def _same_generation(a: nn.Module, b: nn.Module) -> None:
    ids = IDS["input_ids"]
    for use_cache in (True, False):
        ga = a.generate(ids, max_new_tokens=6, do_sample=False, use_cache=use_cache, pad_token_id=0)
        gb = b.generate(ids, max_new_tokens=6, do_sample=False, use_cache=use_cache, pad_token_id=0)
        assert ga.shape == (2, 14) and torch.equal(ga, gb)


def _config(path: Path) -> dict[str, Any]:
    return json.loads((path / "config.json").read_text())


def test_llama_nonuniform_mlp_and_hidden_round_trip(tmp_path: Path) -> None:
    model = _llama()
    _prune(model, [0.25, 0.5], hidden=16)
    assert [w["intermediate_size"] for w in hf.layer_widths(model)] == [96, 64]
    loaded = _round_trip(model, tmp_path)
    config = _config(tmp_path)
    assert config["hidden_size"] == 48 and config["head_dim"] == 16 and config["intermediate_size"] == 96
    assert config[hf.RECORD]["1"] == {"intermediate_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
                                      "head_dim": 16}
    assert loaded.model.layers[1].mlp.intermediate_size == 64 and loaded.model.layers[1].mlp.hidden_size == 48
    assert model.model.layers[1].mlp.intermediate_size == 64  # sync_config fixed the pruned model's attributes too
    _same_generation(model, loaded)
    with pytest.raises(RuntimeError, match="mismatch"):  # plain HF cannot: widths differ per layer
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path)


def test_llama_uniform_widths_load_with_plain_from_pretrained(tmp_path: Path) -> None:
    model = _llama()
    _prune(model, [0.25, 0.25], hidden=8)
    loaded = _round_trip(model, tmp_path, transformers.AutoModelForCausalLM.from_pretrained)
    assert hf.RECORD not in _config(tmp_path) and loaded.config.intermediate_size == 96
    assert loaded.config.hidden_size == 56
    _same_generation(model, loaded)


def test_sparsifier_str_prune_then_save_has_no_parametrizations(tmp_path: Path) -> None:
    model = _llama()
    sp = Sparsifier(model, IDS, adapter="filter_norm", policy=STRConfig(s_init=-1.2))
    with pytest.raises(SparsifyError, match="parametrizations"):
        hf.save_pretrained(model, tmp_path / "soft")
    assert not (tmp_path / "soft").exists()
    soft = _logits(model)
    result = sp.prune()
    assert result.params_after < result.params_before
    assert (soft - _logits(model)).abs().max() <= 1e-10
    widths = [w["intermediate_size"] for w in hf.layer_widths(model)]
    assert all(0 < w < 128 for w in widths), widths
    loaded = _round_trip(model, tmp_path / "pruned")
    _same_generation(model, loaded)


def test_bert_mlp_and_hidden_round_trip(tmp_path: Path) -> None:
    model = _bert()
    _prune(model, [0.5, 0.25], hidden=8)
    _round_trip(model, tmp_path)
    config = _config(tmp_path)
    # 4 heads of size 8 on a 24-wide residual stream: BertConfig cannot say head size 8, the record does
    assert config["hidden_size"] == 24 and config["num_attention_heads"] == 4
    assert config[hf.RECORD]["0"] == {"intermediate_size": 32, "num_attention_heads": 4, "head_dim": 8}


def test_bert_uniform_head_pruning_the_config_cannot_express(tmp_path: Path) -> None:
    model = _bert()
    if len(_head_groups(model)) != 2:
        pytest.skip("BERT attention heads are not prunable in this tree")
    _prune(model, [0.0, 0.25], heads={0: [1], 1: [3]})  # 3 heads of 8 in both layers: 32 % 3 != 0
    _round_trip(model, tmp_path)
    config = _config(tmp_path)
    assert config["num_attention_heads"] == 4  # BertConfig(hidden_size=32, num_attention_heads=3) cannot build
    assert [config[hf.RECORD][str(i)]["num_attention_heads"] for i in range(2)] == [3, 3]
    assert model.bert.encoder.layer[0].attention.self.all_head_size == 24


def test_gpt2_round_trip(tmp_path: Path) -> None:
    model = _gpt2()
    if len(_mlp_groups(build_channel_graph(model, IDS))) != 2:
        pytest.skip("GPT-2's Conv1D MLP is not prunable by the channel graph in this tree")
    heads = {0: [1]} if len(_head_groups(model)) == 2 else None
    _prune(model, [0.25, 0.5], heads=heads)
    loaded = _round_trip(model, tmp_path)
    config = _config(tmp_path)
    assert config["n_inner"] == 96 and config["n_head"] == 4
    if heads:
        assert config[hf.RECORD]["0"] == {"intermediate_size": 96, "num_attention_heads": 3, "head_dim": 8}
        assert loaded.transformer.h[0].attn.split_size == 24 and loaded.transformer.h[0].attn.c_attn.nf == 72
    _same_generation(model, loaded)


def test_heads_round_trip(tmp_path: Path) -> None:
    model = _llama()
    cg = build_channel_graph(model, IDS)
    if not [g for g in cg.prunable_groups() if g.kind in ("head", "kv_group")]:
        pytest.skip("attention heads are not prunable in this tree yet")
    _prune(model, [0.25, 0.5], heads={0: [1]})  # layer 0 loses one of its two key/value groups
    widths = hf.layer_widths(model)
    assert [(w["num_attention_heads"], w["num_key_value_heads"]) for w in widths] == [(2, 1), (4, 2)]
    loaded = _round_trip(model, tmp_path)
    assert loaded.model.layers[0].self_attn.num_key_value_groups == 2
    _same_generation(model, loaded)


# ----- bad input -----------------------------------------------------------------------------
def test_unsynced_directory_gives_clear_error(tmp_path: Path) -> None:
    model = _llama()
    _prune(model, [0.25, 0.5])
    model.save_pretrained(tmp_path)  # plain HF save: config.json still says intermediate_size 128
    with pytest.raises(LoadError, match=r"has no 'sparsify_layer_widths'.*sparsify.hf.save_pretrained"):
        hf.from_pretrained(tmp_path)


def test_record_that_disagrees_with_weights_gives_clear_error(tmp_path: Path) -> None:
    model = _llama()
    _prune(model, [0.25, 0.5])
    hf.save_pretrained(model, tmp_path)
    config = _config(tmp_path)
    config[hf.RECORD]["1"]["intermediate_size"] = 100
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(LoadError, match="recorded widths disagree"):
        hf.from_pretrained(tmp_path)
    del config[hf.RECORD]["1"]["head_dim"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(LoadError, match="entry for layer 1 is invalid"):
        hf.from_pretrained(tmp_path)


def test_inconsistent_weights_are_refused_and_nothing_changes() -> None:
    model = _llama()
    model.model.layers[0].mlp.up_proj = nn.Linear(64, 100, bias=False).double()  # gate_proj has 128 rows
    before = model.config.to_dict()
    with pytest.raises(SparsifyError, match=r"layer 0.*MLP widths disagree.*gate_proj=128, up_proj=100"):
        hf.sync_config(model)
    assert model.config.to_dict() == before


def test_hidden_width_the_config_class_rejects() -> None:
    model = _llama()
    _prune(model, [0.0, 0.0], hidden=3)  # 61 is not a multiple of 4 heads: LlamaConfig refuses it
    before = model.config.to_dict()
    with pytest.raises(SparsifyError, match=r"no LlamaConfig describes.*hidden_size=61.*sparsify.save"):
        hf.sync_config(model)
    assert model.config.to_dict() == before


def test_unknown_family() -> None:
    model = _llama()
    model.config.model_type = "my_llama"
    with pytest.raises(SparsifyError, match="register_family"):
        hf.sync_config(model)


def test_qwen3_heads_and_mlp_round_trip(tmp_path: Path) -> None:
    """Qwen3 (per-head q_norm/k_norm) is a LLaMA-style family: non-uniform widths save and load."""
    config = transformers.Qwen3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=100,
                                      use_cache=False, pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.Qwen3ForCausalLM(config).eval().double()
    _prune(model, [0.25, 0.5], heads={0: [1]})
    widths = hf.layer_widths(model)
    assert [w["intermediate_size"] for w in widths] == [96, 64]
    assert [(w["num_attention_heads"], w["num_key_value_heads"]) for w in widths] == [(2, 1), (4, 2)]
    loaded = _round_trip(model, tmp_path)
    _same_generation(model, loaded)
