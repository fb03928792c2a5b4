"""Head-dimension pruning for Hugging Face LLaMA (GQA, rotary), GPT-2 and BERT (sparsify.hf.attention).

``hf.explicit_attention_`` swaps each attention for a subclass with a constant head count, the original
scale and (LLaMA) its own rotary frequencies: identical outputs, head_dim slot groups (q/k and v/o) that
prune exactly, and save_pretrained → from_pretrained that rebuilds per-layer head_dims.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from sparsify import GMPConfig, HeadsConfig, Sparsifier, SparsifyError, build_channel_graph, hf, prune_channels
from sparsify.io import LoadError
from sparsify.testing.oracle import check_exactness, soft_zero_

transformers = pytest.importorskip("transformers")

IDS = {"input_ids": torch.randint(1, 100, (2, 8), generator=torch.Generator().manual_seed(1))}
TOL = 1e-10


def _llama(kv_heads: int = 2) -> nn.Module:
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=kv_heads, vocab_size=100, use_cache=False, pad_token_id=0)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval().double()


def _gpt2() -> nn.Module:
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=32, use_cache=False,
                                     bos_token_id=0, eos_token_id=0, pad_token_id=0)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).eval().double()


def _bert() -> nn.Module:
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                     vocab_size=100, max_position_embeddings=32)
    torch.manual_seed(0)
    return transformers.BertForMaskedLM(config).eval().double()


MODELS = {"llama": _llama, "gpt2": _gpt2, "bert": _bert}
CAUSAL = ("llama", "gpt2")


def _logits(model: nn.Module, ids: dict[str, torch.Tensor] = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(**ids).logits


def _generate(model: nn.Module, use_cache: bool) -> torch.Tensor:
    return model.generate(IDS["input_ids"], attention_mask=torch.ones_like(IDS["input_ids"]), max_new_tokens=6,
                          do_sample=False, use_cache=use_cache, pad_token_id=0)


def _slot_groups(model: nn.Module) -> list[Any]:
    groups = [g for g in build_channel_graph(model, IDS).prunable_groups() if g.kind == "head_dim"]
    assert groups and all(g.exact for g in groups)
    return groups


@pytest.mark.parametrize("family", list(MODELS))
def test_swap_is_identical_and_exposes_head_dim_slots(family: str) -> None:
    reference = MODELS[family]()
    model = hf.explicit_attention_(copy.deepcopy(reference))
    ids = {**IDS, "attention_mask": torch.tensor([[1] * 8, [0, 0] + [1] * 6])}  # padding: a real mask
    for inputs in (IDS, ids):
        assert (_logits(reference, inputs) - _logits(model, inputs)).abs().max() <= 1e-12
    added = set(model.state_dict()) - set(reference.state_dict())  # LLaMA: each layer's rotary frequencies
    assert added == ({f"model.layers.{i}.self_attn.inv_freq" for i in range(2)} if family == "llama" else set())
    if family in CAUSAL:
        for use_cache in (True, False):
            assert torch.equal(_generate(reference, use_cache), _generate(model, use_cache))
    groups = _slot_groups(model)
    # LLaMA, BERT: q/k slots and v/o slots are two groups per layer (LLaMA: 8 rotary pairs of 16 slots);
    # GPT-2's fused c_attn makes them one group of 8 q/k + 8 v structures
    widths = {"llama": [8, 16] * 2, "gpt2": [16, 16], "bert": [8, 8] * 2}[family]
    assert [g.width for g in groups] == widths
    assert hf.explicit_attention_(model) is model  # already swapped: a no-op
    assert _logits(model).equal(_logits(hf.explicit_attention_(copy.deepcopy(model))))


@pytest.mark.parametrize("family", list(MODELS))
def test_oracle(family: str) -> None:
    model = hf.explicit_attention_(MODELS[family]())
    result = check_exactness(model, IDS)
    assert result.max_abs_diff <= TOL
    slots = [g.name for g in result.graph.groups if g.kind == "head_dim"]
    assert slots and set(slots) <= set(result.report.widths)


# per family: layer → structures removed from its head_dim groups (q/k group first); GPT-2: one group,
# structures 0..7 are q/k slots, 8..15 v slots
PLANS = {
    "llama": [([1, 5], [0, 3, 9]), ([0, 2, 3, 7], [])],  # LLaMA q/k structures are rotary pairs (2 slots)
    "gpt2": [([0, 2, 5, 9],), ([1, 12, 13, 14],)],
    "bert": [([2], [0, 1, 7]), ([1, 3, 4, 6], [5])],
}
EXPECTED = {  # (head_dim, v_head_dim) per layer after PLANS
    "llama": [(12, 13), (8, 16)], "gpt2": [(5, 7), (7, 5)], "bert": [(7, 5), (4, 7)],
}


def _prune_slots(model: nn.Module, family: str) -> nn.Module:
    """Zero then remove PLANS[family]; returns the soft (zeroed, unpruned) copy."""
    cg = build_channel_graph(model, IDS)
    groups = [g for g in cg.prunable_groups() if g.kind == "head_dim"]
    flat = [s for layer in PLANS[family] for s in layer]
    assert len(groups) == len(flat)
    plan = {g.id: np.asarray(s) for g, s in zip(groups, flat, strict=True) if s}
    soft_zero_(model, cg.groups, plan)
    soft = copy.deepcopy(model)
    prune_channels(cg, plan, verify_atol=1e-12)
    assert (_logits(soft) - _logits(model)).abs().max() <= TOL
    return soft


@pytest.mark.parametrize("family", list(MODELS))
def test_nonuniform_head_dims_round_trip(family: str, tmp_path: Path) -> None:
    model = hf.explicit_attention_(MODELS[family]())
    soft = _prune_slots(model, family)
    if family in CAUSAL:  # the KV cache of the pruned model holds keys/values of the new head_dims
        assert torch.equal(_generate(soft, True), _generate(model, True))
    dims = hf.head_dims(model)
    assert [(d["head_dim"], d["v_head_dim"]) for d in dims] == EXPECTED[family]
    assert all(d["scaling"] == 8 ** -0.5 if family != "llama" else d["scaling"] == 16 ** -0.5 for d in dims)
    if family == "llama":
        attn = model.model.layers[0].self_attn
        assert attn.inv_freq.shape == (6,) and attn.q_proj.out_features == 4 * 12 and attn.k_proj.out_features == 24
        assert attn.o_proj.in_features == 4 * 13
    expected = _logits(model)
    hf.save_pretrained(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert [config[hf.HEAD_DIMS][str(i)]["v_head_dim"] for i in range(2)] == [e[1] for e in EXPECTED[family]]
    loaded = hf.from_pretrained(tmp_path).eval()
    assert torch.equal(_logits(loaded), expected)
    state, loaded_state = model.state_dict(), loaded.state_dict()
    assert state.keys() == loaded_state.keys() and all(torch.equal(state[k], loaded_state[k]) for k in state)
    assert hf.head_dims(loaded) == dims and hf.layer_widths(loaded) == hf.layer_widths(model)
    if family in CAUSAL:
        for use_cache in (True, False):
            assert torch.equal(_generate(model, use_cache), _generate(loaded, use_cache))
    with pytest.raises(RuntimeError, match="mismatch"):  # plain Hugging Face cannot load it
        type(model).from_pretrained(tmp_path)


def _group_with(cg: Any, tensor: str) -> Any:
    return next(g for g in cg.groups if any(m.tensor == tensor and m.dim == 0 for m in g.members))


@pytest.mark.parametrize("kv_heads", [2, 4], ids=["one_kv_head_left", "mha"])
def test_slots_after_whole_heads_and_mlp(kv_heads: int, tmp_path: Path) -> None:
    """Whole KV groups / heads first (HF attention), then swap and prune slots; MLP widths differ per layer
    too. With GQA, layer 0 keeps a single key/value head: its k is not split into heads, and its rotary
    halves are still paired (``layout._one_head_block``)."""
    model = _llama(kv_heads)
    cg = build_channel_graph(model, IDS)
    heads = [g for g in cg.prunable_groups() if g.kind in ("head", "kv_group")]
    mlp = [g for g in cg.prunable_groups() if "mlp.gate_proj" in g.name]
    plan = {heads[0].id: np.array([1]), mlp[1].id: np.arange(0, 96, 3)}
    soft_zero_(model, cg.groups, plan)
    prune_channels(cg, plan, verify_atol=1e-12)
    hf.explicit_attention_(model)
    attn = model.model.layers[0].self_attn
    left = (2, 1) if kv_heads == 2 else (3, 3)
    assert (attn.num_heads, attn.num_kv_heads) == left
    cg = build_channel_graph(model, IDS)
    qk0, v0, v1 = (_group_with(cg, f"model.layers.{i}.self_attn.{p}_proj.weight") for i, p in ((0, "q"), (0, "v"),
                                                                                                 (1, "v")))
    assert qk0.kind == "head_dim" and qk0.width == 8 and v0.width == 16
    assert all(g.prunable and g.exact for g in (qk0, v0, v1))
    plan = {qk0.id: np.array([0, 4]), v0.id: np.array([2, 3]), v1.id: np.array([5])}
    soft_zero_(model, cg.groups, plan)
    soft = copy.deepcopy(model)
    prune_channels(cg, plan, verify_atol=1e-12)
    assert (_logits(soft) - _logits(model)).abs().max() <= TOL
    for use_cache in (True, False):
        assert torch.equal(_generate(soft, use_cache), _generate(model, use_cache))
    widths = hf.layer_widths(model)
    assert [(w["num_attention_heads"], w["num_key_value_heads"], w["head_dim"], w["intermediate_size"])
            for w in widths] == [(*left, 12, 96), (4, kv_heads, 16, 64)]
    hf.save_pretrained(model, tmp_path)
    loaded = hf.from_pretrained(tmp_path).eval()
    assert torch.equal(_logits(loaded), _logits(model))
    assert [(d["head_dim"], d["v_head_dim"]) for d in hf.head_dims(loaded)] == [(12, 14), (16, 15)]
    for use_cache in (True, False):
        assert torch.equal(_generate(model, use_cache), _generate(loaded, use_cache))


@pytest.mark.parametrize("family", list(MODELS))
def test_sparsifier_heads_adapter_reaches_hf_head_dim_slots(family: str, tmp_path: Path) -> None:
    model = hf.explicit_attention_(MODELS[family]())
    config = GMPConfig(sparsity=0.25, start_step=0, end_step=3, update_every=1)
    sp = Sparsifier(model, IDS, adapter=HeadsConfig(head_dim=True), policy=config)
    slots = [g for g in sp.graph.groups if g.kind == "head_dim" and g.prunable]
    assert len(slots) == (2 if family == "gpt2" else 4)
    assert sorted(v.group.name for v in sp.vectors) == sorted(g.name for g in slots)
    scaled = {m.tensor for v in sp.vectors for m in v.handle["scaled"]}
    assert not any("inv_freq" in t for t in scaled) and any(t.endswith(("q_proj.weight", "c_attn.weight",
                                                                         "query.weight")) for t in scaled)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    for _ in range(4):
        loss = model(**IDS, labels=IDS["input_ids"]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sp.step()
    soft = _logits(model)
    sp.prune()
    assert (soft - _logits(model)).abs().max() <= TOL
    full = 16 if family == "llama" else 8
    dims = hf.head_dims(model)
    assert all(d["head_dim"] + d["v_head_dim"] < 2 * full for d in dims), dims
    if family != "gpt2":  # two groups per layer, each loses a quarter
        assert all(d["head_dim"] < full and d["v_head_dim"] < full for d in dims), dims
    hf.save_pretrained(model, tmp_path)
    loaded = hf.from_pretrained(tmp_path).eval()
    assert torch.equal(_logits(loaded), _logits(model))
    if family in CAUSAL:
        assert torch.equal(_generate(model, True), _generate(loaded, True))


# ----- bad input -----------------------------------------------------------------------------
def test_unsupported_attention_is_refused_and_the_model_untouched() -> None:
    config = transformers.MistralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=100)
    model = transformers.MistralForCausalLM(config).eval()
    classes = [type(m) for m in model.modules()]
    with pytest.raises(SparsifyError, match=r"MistralAttention.*not support.*LlamaAttention"):
        hf.explicit_attention_(model)
    assert [type(m) for m in model.modules()] == classes
    gpt2 = _gpt2()
    gpt2.config.reorder_and_upcast_attn = True
    for block in gpt2.transformer.h:
        block.attn.reorder_and_upcast_attn = True
    with pytest.raises(SparsifyError, match="reorder_and_upcast_attn"):
        hf.explicit_attention_(gpt2)
    assert type(gpt2.transformer.h[0].attn) is transformers.models.gpt2.modeling_gpt2.GPT2Attention
    with pytest.raises(SparsifyError, match="no attention module"):
        hf.explicit_attention_(nn.Sequential(nn.Linear(4, 4)))


def test_gpt2_plan_that_empties_the_qk_slots_is_refused_and_rolled_back() -> None:
    """GPT-2's q/k and v slots share one group (fused c_attn): removing all q/k structures is refused."""
    model = hf.explicit_attention_(_gpt2())
    cg = build_channel_graph(model, IDS)
    group = next(g for g in cg.prunable_groups() if g.kind == "head_dim")
    soft_zero_(model, cg.groups, {group.id: np.arange(8)})
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(SparsifyError, match="removes every q/k slot"):
        prune_channels(cg, {group.id: np.arange(8)})
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.transformer.h[0].attn.head_dim == 8


def test_mixed_swapped_layers_and_corrupt_record(tmp_path: Path) -> None:
    model = hf.explicit_attention_(_bert())
    _prune_slots(model, "bert")
    hf.save_pretrained(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config[hf.HEAD_DIMS]["1"]["v_head_dim"] = 6  # disagrees with the saved value weights
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(LoadError, match="recorded widths disagree"):
        hf.from_pretrained(tmp_path)
    del config[hf.HEAD_DIMS]["1"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(LoadError, match="entry for layer 1 is missing"):
        hf.from_pretrained(tmp_path)
    half = _bert()
    hf.explicit_attention_(half.bert.encoder.layer[0])  # only one layer swapped
    before = half.config.to_dict()
    with pytest.raises(SparsifyError, match="some layers"):
        hf.sync_config(half)
    assert half.config.to_dict() == before
