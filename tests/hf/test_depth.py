"""Depth pruning of Hugging Face decoders (issue #20): whole layers and attention / MLP sub-blocks removed
exactly where their residual contributions are zero, cache and config kept right, save/load round trip."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from sparsify import SparsifyError, hf
from sparsify.errors import PruneError
from sparsify.hf import sublayers
from sparsify.io import LoadError
from sparsify.testing.snapshot import assert_unchanged, snapshot

transformers = pytest.importorskip("transformers")

IDS = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(1))
_BASE = {"vocab_size": 128, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 4,
         "num_attention_heads": 4, "num_key_value_heads": 2, "use_cache": False, "pad_token_id": 0,
         "bos_token_id": 1, "eos_token_id": 2}
CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", {"sliding_window": 3}),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", {"head_dim": 16}),
    "qwen2_mixed": ("Qwen2Config", {"use_sliding_window": True, "sliding_window": 3, "layer_types": [
        "full_attention", "sliding_attention", "full_attention", "sliding_attention"]}),
}


def _model(name: str = "llama", seed: int = 0) -> nn.Module:
    cls, fields = CONFIGS[name]
    config = getattr(transformers, cls)(**{**_BASE, **fields})
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config).eval().double()


def _zero_(model: nn.Module, attention: list[int] = (), mlp: list[int] = ()) -> None:
    with torch.no_grad():
        for i in attention:
            model.model.layers[i].self_attn.o_proj.weight.zero_()
        for i in mlp:
            model.model.layers[i].mlp.down_proj.weight.zero_()


def _behaviour(model: nn.Module) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return {"logits": model(input_ids=IDS).logits,
                **{f"generate_cache_{c}": model.generate(IDS, max_new_tokens=5, do_sample=False, use_cache=c)
                   for c in (True, False)}}


def _assert_same(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> None:
    rel = ((after["logits"] - before["logits"]).abs().max() / before["logits"].abs().max()).item()
    assert rel <= 1e-9, rel
    for key in ("generate_cache_True", "generate_cache_False"):
        assert torch.equal(before[key], after[key]), key


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_removing_layers_whose_contributions_are_zero_is_exact(name: str) -> None:
    model = _model(name)
    types = list(getattr(model.config, "layer_types", None) or [])
    _zero_(model, attention=[0, 2], mlp=[0, 2])
    before = _behaviour(model)
    kept = [model.model.layers[1], model.model.layers[3]]
    hf.remove_layers(model, [0, 2])
    assert list(model.model.layers) == kept and model.config.num_hidden_layers == 2
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1]
    if types:
        assert model.config.layer_types == [types[1], types[3]]
    _assert_same(before, _behaviour(model))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_removing_sublayers_whose_outputs_are_zero_is_exact(name: str) -> None:
    model = _model(name)
    _zero_(model, attention=[0, 3], mlp=[2])
    before = _behaviour(model)
    hf.remove_sublayers(model, attention=[0, 3], mlp=[2])
    layers = model.model.layers
    assert isinstance(layers[0].self_attn, sublayers.RemovedAttention)
    assert isinstance(layers[2].mlp, sublayers.RemovedMLP)
    assert isinstance(layers[0].input_layernorm, nn.Identity) and not any(
        "layers.0.self_attn" in k or "layers.2.mlp." in k for k in model.state_dict())
    assert model.config.sparsify_removed_sublayers == {"attention": [0, 3], "mlp": [2]}
    _assert_same(before, _behaviour(model))


def test_removed_first_attention_keeps_the_cache_consistent() -> None:
    """Layer 0's cache slot gives the sequence length: without its placeholder, cached decoding would
    restart the positions. Removing a non-zero attention changes the model, but cache on = cache off."""
    model = _model("qwen2_mixed")
    hf.remove_sublayers(model, attention=[0, 1])
    behaviour = _behaviour(model)
    assert torch.equal(behaviour["generate_cache_True"], behaviour["generate_cache_False"])
    with torch.no_grad():
        full = model(input_ids=IDS).logits
        cache = transformers.DynamicCache(config=model.config)
        step1 = model(input_ids=IDS[:, :4], use_cache=True, past_key_values=cache)
        step2 = model(input_ids=IDS[:, 4:], use_cache=True, past_key_values=step1.past_key_values)
    assert torch.allclose(torch.cat([step1.logits, step2.logits], 1), full, rtol=0, atol=1e-10)


def test_removing_layers_renumbers_the_per_layer_records() -> None:
    model = _model("llama")
    hf.remove_sublayers(model, attention=[3], mlp=[1])
    model.config.sparsify_layer_widths = {str(i): {"intermediate_size": 90 + i} for i in range(4)}
    hf.remove_layers(model, [0, 2])
    assert model.config.sparsify_removed_sublayers == {"attention": [1], "mlp": [0]}
    assert model.config.sparsify_layer_widths == {"0": {"intermediate_size": 91}, "1": {"intermediate_size": 93}}
    hf.remove_layers(model, [0])
    assert model.config.sparsify_removed_sublayers == {"attention": [0], "mlp": []}


@pytest.mark.parametrize("name", ["llama", "qwen2_mixed"])
def test_shallower_model_round_trips_through_its_config_alone(name: str, tmp_path: Any) -> None:
    model = _model(name)
    hf.remove_layers(model, [1, 2])
    hf.save_pretrained(model, tmp_path)
    with torch.no_grad():
        expected = model(input_ids=IDS).logits
        for loaded in (transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64),
                       hf.from_pretrained(tmp_path, dtype=torch.float64)):
            assert loaded.config.num_hidden_layers == 2
            assert getattr(loaded.config, "layer_types", None) == getattr(model.config, "layer_types", None)
            assert torch.equal(loaded.eval()(input_ids=IDS).logits, expected)


def test_removed_sublayers_round_trip(tmp_path: Any) -> None:
    model = _model("qwen2_mixed")
    hf.remove_sublayers(model, attention=[0], mlp=[1, 3])
    hf.remove_layers(model, [2])
    hf.save_pretrained(model, tmp_path)
    loaded = hf.from_pretrained(tmp_path, dtype=torch.float64).eval()
    assert sublayers.removed_sublayers(loaded) == {"attention": [0], "mlp": [1, 2]}
    assert set(loaded.state_dict()) == set(model.state_dict())
    _assert_same(_behaviour(model), _behaviour(loaded))


def test_a_record_that_does_not_fit_the_checkpoint_is_refused(tmp_path: Any) -> None:
    model = _model("llama")
    hf.remove_sublayers(model, mlp=[1])
    model.config.sparsify_removed_sublayers = {"attention": [], "mlp": [1, 2]}  # layer 2's MLP is saved
    model.save_pretrained(tmp_path)
    with pytest.raises(LoadError, match="tensors of removed sub-blocks"):
        hf.from_pretrained(tmp_path)


def test_unknown_family_is_refused_naming_the_supported_ones() -> None:
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64)
    model = transformers.GPT2LMHeadModel(config)
    with pytest.raises(SparsifyError, match=r"model_type 'gpt2'.*llama"):
        hf.remove_layers(model, [0])
    with pytest.raises(SparsifyError, match="gpt2"):
        hf.layer_importance(model, [torch.zeros(1, 4, dtype=torch.long)])


@pytest.mark.parametrize(("call", "match"), [
    (lambda m: hf.remove_layers(m, [4]), "does not exist"),
    (lambda m: hf.remove_layers(m, [1, 1]), "repeat"),
    (lambda m: hf.remove_layers(m, [True]), "integers"),
    (lambda m: hf.remove_layers(m, range(4)), "all 4"),
    (lambda m: hf.remove_layers(m, 2), "list of layer indices"),
    (lambda m: hf.remove_sublayers(m, attention=[1], mlp=[1]), "remove_layers"),
    (lambda m: hf.remove_sublayers(m, mlp=[0]), "already removed"),
])
def test_bad_requests_are_refused_and_leave_the_model_untouched(call: Any, match: str) -> None:
    model = _model("llama")
    hf.remove_sublayers(model, mlp=[0])
    before, config = snapshot(model), model.config.to_dict()
    with pytest.raises(SparsifyError, match=match):
        call(model)
    assert_unchanged(before, model)
    assert model.config.to_dict() == config


def test_a_failure_midway_leaves_the_model_untouched(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model("qwen2_mixed")
    before, config, layers = snapshot(model), model.config.to_dict(), list(model.model.layers)

    def broken() -> None:
        raise ValueError("injected")

    monkeypatch.setattr(type(model.config), "validate", lambda self: broken())
    with pytest.raises(PruneError, match=r"left unchanged.*injected"):
        hf.remove_layers(model, [1])
    with pytest.raises(PruneError, match="injected"):
        hf.remove_sublayers(model, attention=[2])
    assert_unchanged(before, model)
    assert list(model.model.layers) == layers and model.config.to_dict() == config
    assert [layer.self_attn.layer_idx for layer in layers] == [0, 1, 2, 3]


# ----- importance ------------------------------------------------------------------------------
def test_block_influence_is_one_minus_the_cosine_of_each_layers_input_and_output() -> None:
    model = _model("llama")
    _zero_(model, attention=[1], mlp=[1, 2])
    scores = hf.layer_importance(model, [IDS[:1], {"input_ids": IDS[1:]}])
    with torch.no_grad():
        hidden = model(input_ids=IDS, output_hidden_states=True).hidden_states
    for i in range(3):  # the last entry of hidden_states is after the final norm
        cos = torch.nn.functional.cosine_similarity(hidden[i], hidden[i + 1], dim=-1)
        assert scores[i].item() == pytest.approx(1 - cos.mean().item(), abs=1e-12)
    assert scores.dtype == torch.float64 and scores.shape == (4,)
    assert abs(scores[1]) < 1e-12 and (scores[[0, 2, 3]] > 1e-4).all()
    attn = hf.layer_importance(model, [IDS], "attn_block_influence")
    mlp = hf.layer_importance(model, [IDS], "mlp_block_influence")
    assert abs(attn[1]) < 1e-12 and attn[2] > 1e-4 and abs(mlp[1]) < 1e-12 and abs(mlp[2]) < 1e-12 and mlp[3] > 1e-6


def test_padded_tokens_do_not_count() -> None:
    model = _model("llama")
    padded = {"input_ids": torch.cat([IDS, torch.zeros(2, 3, dtype=torch.long)], 1),
              "attention_mask": torch.cat([torch.ones(2, 6), torch.zeros(2, 3)], 1).long()}
    for method in ("block_influence", "ppl_drop"):
        a, b = hf.layer_importance(model, [padded], method), hf.layer_importance(model, [IDS], method)
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12), method


def test_ppl_drop_is_zero_for_an_identity_layer_and_the_model_mode_is_kept() -> None:
    model = _model("qwen3")
    _zero_(model, attention=[2], mlp=[2])
    model.train()
    drop = hf.layer_importance(model, [IDS], "ppl_drop")
    assert model.training
    assert abs(drop[2]) < 1e-9 and (drop[[0, 1, 3]].abs() > 1e-6).all()
    with pytest.raises(SparsifyError, match="block_influence"):
        hf.layer_importance(model, [IDS], "magic")
    with pytest.raises(SparsifyError, match="at least one"):
        hf.layer_importance(model, [])
