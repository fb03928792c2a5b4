"""Hidden-size (residual stream) pruning with calibrated compensation: sparsify.hf.hidden."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from sparsify import build_channel_graph, hf, prune_channels  # noqa: E402
from sparsify.errors import InexactPruneError, SparsifyError  # noqa: E402
from sparsify.hf.hidden import stream_sites  # noqa: E402

prune_hidden, hidden_importance = hf.prune_hidden, hf.hidden_importance  # the public names

_CONFIG = {"vocab_size": 96, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "use_cache": False}


def _model(cls=transformers.LlamaForCausalLM, config_cls=transformers.LlamaConfig, **extra) -> torch.nn.Module:
    torch.manual_seed(0)
    model = cls(config_cls(**{**_CONFIG, **extra})).double().eval()
    with torch.no_grad():  # an uneven residual stream, as trained models have: some channels carry little
        model.model.embed_tokens.weight.mul_(torch.linspace(0.05, 2.0, 64, dtype=torch.float64))
    return model


def _batches(n: int = 4, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 96, (2, 24), generator=g)} for _ in range(n)]


def _error(model: torch.nn.Module, reference: list[torch.Tensor], batches: list[dict[str, torch.Tensor]]) -> float:
    with torch.no_grad():
        return float(sum((model(**b).logits - r).pow(2).mean() for b, r in zip(batches, reference, strict=True)))


def test_compensation_reduces_error_on_the_calibration_data() -> None:
    dense, batches = _model(), _batches()
    with torch.no_grad():
        reference = [dense(**b).logits for b in batches]
    errors = {}
    for mode in ("none", "scale", "lstsq"):
        model = copy.deepcopy(dense)
        result = prune_hidden(model, batches, 0.25, compensate=mode)
        assert len(result.kept) == 48 and model.config.hidden_size == 48
        errors[mode] = _error(model, reference, batches)
    assert errors["lstsq"] < 0.9 * errors["none"], errors
    assert errors["scale"] < errors["none"], errors


def test_importance_keeps_the_energetic_channels() -> None:
    model = _model()
    scores = hidden_importance(model, _batches(2))
    assert scores.shape == (64,) and np.isfinite(scores).all()
    energy = hidden_importance(model, _batches(2), score="energy")
    assert np.corrcoef(np.argsort(np.argsort(energy)), np.arange(64))[0, 1] > 0.8  # the embedding's column scale


def test_shapes_config_round_trip_and_generate(tmp_path: Path) -> None:
    model = _model(tie_word_embeddings=False)
    result = prune_hidden(model, _batches(), keep=40)
    assert len(result.kept) == 40 and not result.fallback  # untied head: fitted by least squares too
    assert model.config.hidden_size == 40
    layer = model.model.layers[0]
    assert model.model.embed_tokens.weight.shape == (96, 40) and model.lm_head.weight.shape == (96, 40)
    assert layer.self_attn.q_proj.weight.shape == (64, 40) and layer.self_attn.o_proj.weight.shape == (40, 64)
    assert layer.mlp.gate_proj.weight.shape == (96, 40) and layer.mlp.down_proj.weight.shape == (40, 96)
    assert layer.input_layernorm.weight.shape == (40,) and model.model.norm.weight.shape == (40,)
    ids = _batches(1)[0]["input_ids"]
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64).eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, expected)
    out = loaded.generate(ids[:1, :6], max_new_tokens=5, do_sample=False, use_cache=True, pad_token_id=0)
    assert out.shape == (1, 11)


def test_tied_head_falls_back_to_the_norm_scale() -> None:
    model = _model(tie_word_embeddings=True)
    result = prune_hidden(model, _batches(), 0.25)
    assert set(result.fallback) == {"lm_head"}
    assert model.lm_head.weight is model.model.embed_tokens.weight and model.lm_head.weight.shape == (96, 48)


def test_consumer_biases_take_the_intercept() -> None:
    model = _model(transformers.Qwen2ForCausalLM, transformers.Qwen2Config)  # q/k/v have biases
    before = model.model.layers[0].self_attn.q_proj.bias.detach().clone()
    prune_hidden(model, _batches(), 0.25)
    after = model.model.layers[0].self_attn.q_proj.bias
    assert after.shape == before.shape and not torch.equal(after, before)
    assert model.config.hidden_size == 48


def test_the_oracle_refuses_the_residual_group_as_exact() -> None:
    model = _model()
    cg = build_channel_graph(model, _batches(1)[0])
    group = next(g for g in cg.groups if any(m.tensor == "model.embed_tokens.weight" for m in g.members))
    assert not group.exact and group.inexact
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(InexactPruneError):
        prune_channels(cg, {group.id: [0, 1]})
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_bad_input_is_refused_and_leaves_the_model_untouched() -> None:
    moe = transformers.MixtralForCausalLM(transformers.MixtralConfig(**_CONFIG, num_local_experts=4,
                                                                     num_experts_per_tok=2))
    with pytest.raises(SparsifyError, match="dense LLaMA-style"):
        stream_sites(moe)
    model = _model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(SparsifyError, match="fraction"):
        prune_hidden(model, _batches(1), 1.5)
    with pytest.raises(SparsifyError, match="no calibration batches"):
        prune_hidden(model, [], 0.25)
    with pytest.raises(SparsifyError, match="compensate"):
        prune_hidden(model, _batches(1), 0.25, compensate="rotate")  # type: ignore[arg-type]
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items()) and model.config.hidden_size == 64


def test_a_config_that_cannot_take_the_width_restores_the_model(monkeypatch: pytest.MonkeyPatch) -> None:
    import sparsify.hf.hidden as hidden

    def refuse(_model: torch.nn.Module) -> None:
        raise SparsifyError("no LlamaConfig describes the pruned widths")

    monkeypatch.setattr(hidden, "sync_config", refuse)
    model = _model(tie_word_embeddings=True)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(SparsifyError, match="no LlamaConfig"):
        prune_hidden(model, _batches(1), 0.25)
    assert model.config.hidden_size == 64 and model.lm_head.weight is model.model.embed_tokens.weight
    assert model.model.layers[0].self_attn.q_proj.in_features == 64
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
