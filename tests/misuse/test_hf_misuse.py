"""Misuse of the LLM-facing API (``sparsify.hf``, ``sparsify.lm``): each case ends in a clear error that
names the problem and the fix, with the model (``assert_unchanged``), ``model.config`` and the generation
config as they were (compared as dicts), and the caller's batches untouched."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from sparsify import hf
from sparsify.errors import PruneError, SparsifyError
from sparsify.hf import experts as hf_experts
from sparsify.io import LoadError
from sparsify.lm.distill import distill
from sparsify.lm.evaluate import perplexity
from sparsify.testing.snapshot import assert_unchanged, snapshot

transformers = pytest.importorskip("transformers")

V = 64  # vocabulary of every tiny model


def llama(layers: int = 2, hidden: int = 32, **kw: Any) -> nn.Module:
    torch.manual_seed(0)
    kw = {"use_cache": False, **kw}
    config = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=64, num_hidden_layers=layers,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=V, **kw)
    return transformers.LlamaForCausalLM(config).eval()


def mixtral() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.MixtralConfig(hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=V,
                                        num_local_experts=4, num_experts_per_tok=2, use_cache=False)
    return transformers.MixtralForCausalLM(config).eval()


def ids(batch: int = 2, tokens: int = 8) -> torch.Tensor:
    return torch.randint(0, V, (batch, tokens), generator=torch.Generator().manual_seed(1))


def _state(model: nn.Module) -> tuple[str, str | None]:
    gen = getattr(model, "generation_config", None)
    return (json.dumps(model.config.to_dict(), sort_keys=True, default=str),
            None if gen is None else json.dumps(gen.to_dict(), sort_keys=True, default=str))


def refused(model: nn.Module, call: Callable[[], Any], error: type[Exception], match: str,
            inputs: Any = None) -> None:
    """``call()`` raises ``error`` matching ``match``; model, config, generation config and inputs unchanged."""
    before, state, kept = snapshot(model), _state(model), copy.deepcopy(inputs)
    with pytest.raises(error, match=match):
        call()
    assert_unchanged(before, model)
    assert _state(model) == state
    if inputs is not None:
        for a, b in zip(kept, inputs, strict=True):
            for key in a:
                assert torch.equal(a[key], b[key]) if isinstance(a[key], torch.Tensor) else a[key] == b[key]


# ----- depth ---------------------------------------------------------------------------------------
def test_remove_layers_refuses_a_config_that_miscounts_the_layers() -> None:
    model = llama(3)
    model.config.num_hidden_layers = 5  # edited by hand
    refused(model, lambda: hf.remove_layers(model, [0]), SparsifyError, r"num_hidden_layers is 5 .* 3 decoder layers")


def test_remove_sublayers_refuses_a_config_that_miscounts_the_layers() -> None:
    model = llama(3)
    model.config.num_hidden_layers = 2
    refused(model, lambda: hf.remove_sublayers(model, mlp=[0]), SparsifyError, r"set model.config.num_hidden_layers")


def test_remove_layers_refuses_a_zero_dim_tensor() -> None:
    model = llama(3)
    refused(model, lambda: hf.remove_layers(model, torch.tensor(1)), SparsifyError, r"list of layer indices")


def test_remove_layers_refuses_live_sparsifier_masks() -> None:
    from sparsify import GMPConfig, Sparsifier

    model = llama(2)
    sp = Sparsifier(model, {"input_ids": ids()}, adapter="filter_norm", policy=GMPConfig(sparsity=0.5, end_step=1))
    sp.step()
    refused(model, lambda: hf.remove_layers(model, [0]), SparsifyError, r"Sparsifier.prune\(\) first")


def test_remove_layers_refuses_a_torch_compile_wrapper() -> None:
    model = llama(3)
    compiled = torch.compile(model)
    refused(model, lambda: hf.remove_layers(compiled, [0]), SparsifyError, r"_orig_mod")


# ----- calibration batches -------------------------------------------------------------------------
@pytest.mark.parametrize(("batch", "match"), [
    (ids().float(), r"integer token ids"),
    (ids() + V, r"token ids must be in 0\.\.63"),
    (ids()[0], r"unsqueeze\(0\)"),
    (ids()[:0], r"hold no token"),
    ({"input_ids": ids(), "attention_mask": torch.ones(2, 5, dtype=torch.long)}, r"attention_mask must have the shape"),
    ({"input_ids": ids(), "past_key_values": "cache"}, r"KV cache .* drop those keys"),
], ids=["float", "out_of_vocab", "1d", "empty", "mask_shape", "cache"])
def test_layer_importance_checks_its_batches(batch: Any, match: str) -> None:
    model = llama()
    refused(model, lambda: hf.layer_importance(model, [batch]), SparsifyError, match)


def test_layer_importance_refuses_one_bare_tensor_as_the_batches() -> None:
    model = llama()
    refused(model, lambda: hf.layer_importance(model, ids()), SparsifyError, r"wrap a single batch as \[batch\]")


def test_layer_importance_leaves_a_cache_object_empty() -> None:
    model = llama(use_cache=True)
    cache = transformers.DynamicCache()
    refused(model, lambda: hf.layer_importance(model, [{"input_ids": ids(), "past_key_values": cache}]),
            SparsifyError, r"past_key_values")
    assert cache.get_seq_length() == 0


def test_expert_importance_checks_its_batches() -> None:
    model = mixtral()
    refused(model, lambda: hf_experts.expert_importance(model, []), SparsifyError, r"no calibration batches")
    refused(model, lambda: hf_experts.expert_importance(model, [ids() + V]), SparsifyError, r"0\.\.63")


# ----- hidden size ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("kwargs", "match"), [
    ({"keep": 0}, r"keep must be an int in 1\.\.64"),
    ({"keep": True}, r"keep must be an int"),
    ({"fraction": 0.5, "keep": 32}, r"not both"),
    ({"fraction": 0.25, "multiple_of": 0}, r"multiple_of must be an int ≥ 1"),
    ({"fraction": 0.25, "score": "magnitude"}, r"score must be 'consumer' or 'energy'"),
    ({"fraction": 0.25, "ridge": -1.0}, r"ridge must be a number ≥ 0"),
    ({"fraction": 0.25, "compensate": "none", "importance": np.full(64, np.nan)}, r"NaN or infinite"),
], ids=["keep0", "keep_bool", "both", "multiple0", "score", "ridge", "nan_importance"])
def test_prune_hidden_checks_its_arguments(kwargs: dict[str, Any], match: str) -> None:
    model = llama(hidden=64)
    refused(model, lambda: hf.prune_hidden(model, [ids()], **kwargs), SparsifyError, match)


def test_hidden_importance_refuses_an_unknown_score() -> None:
    model = llama(hidden=64)
    refused(model, lambda: hf.hidden_importance(model, [ids()], score="foo"), SparsifyError, r"'consumer' or 'energy'")


def test_prune_hidden_refuses_a_cache_in_the_batches() -> None:
    model = llama(hidden=64, use_cache=True)
    batches = [{"input_ids": ids(), "use_cache": True}]
    refused(model, lambda: hf.prune_hidden(model, batches, 0.25), SparsifyError, r"use_cache", inputs=batches)


def test_prune_hidden_refuses_a_hand_edited_hidden_size() -> None:
    model = llama(hidden=64)
    model.config.hidden_size = 48
    refused(model, lambda: hf.prune_hidden(model, [ids()], 0.25), SparsifyError, r"sync_config\(model\) first")


def test_prune_hidden_refuses_float_ids() -> None:
    model = llama(hidden=64)
    batches = [{"input_ids": ids().float()}]
    refused(model, lambda: hf.prune_hidden(model, batches, 0.25), SparsifyError, r"integer token ids", inputs=batches)


# ----- experts -------------------------------------------------------------------------------------
@pytest.mark.parametrize(("request_", "match"), [
    ({0: [1.5]}, r"expert indices must be integers"),
    ({0: [1, 1]}, r"indices repeat"),
    ({0: 1}, r"list of indices"),
    ([0, 1], r"must map decoder-layer index"),
    ({1.0: [0]}, r"not a mixture-of-experts layer"),
], ids=["float", "duplicate", "bare_int", "list", "float_layer"])
def test_remove_experts_checks_the_request(request_: Any, match: str) -> None:
    model = mixtral()
    refused(model, lambda: hf_experts.remove_experts(model, request_), PruneError, match)


def test_remove_experts_refuses_a_config_edited_by_hand() -> None:
    model = mixtral()
    model.config.num_experts_per_tok = 5
    refused(model, lambda: hf_experts.remove_experts(model, {0: [0]}), PruneError, r"num_experts_per_tok is 5")
    model = mixtral()
    model.config.num_local_experts = 8
    refused(model, lambda: hf_experts.remove_experts(model, {0: [0]}), PruneError, r"num_local_experts .* disagrees")


def test_prune_experts_refuses_nan_importance() -> None:
    model = mixtral()
    importance = {0: torch.full((4,), float("nan")), 1: torch.ones(4)}
    refused(model, lambda: hf_experts.prune_experts(model, importance), SparsifyError, r"NaN or infinite")


# ----- save / load ---------------------------------------------------------------------------------
def test_sync_config_refuses_a_module_without_config() -> None:
    linear = nn.Linear(2, 2)
    before = snapshot(linear)
    with pytest.raises(SparsifyError, match=r"needs a Hugging Face model with a .config"):
        hf.sync_config(linear)
    assert_unchanged(before, linear)


def test_save_pretrained_refuses_a_file_path_and_a_compiled_model(tmp_path: Path) -> None:
    model = llama()
    file = tmp_path / "model.bin"
    file.write_text("x")
    refused(model, lambda: hf.save_pretrained(model, file), SparsifyError, r"is a file; pass a directory")
    compiled = torch.compile(model)
    refused(model, lambda: hf.save_pretrained(compiled, tmp_path / "c"), SparsifyError, r"_orig_mod")
    assert not (tmp_path / "c").exists()


def test_from_pretrained_refuses_a_class_of_another_family(tmp_path: Path) -> None:
    hf.save_pretrained(llama(), tmp_path / "a")
    with pytest.raises(LoadError, match=r"builds model_type 'gpt2', but the checkpoint is a 'llama' model"):
        hf.from_pretrained(tmp_path / "a", model_class=transformers.GPT2LMHeadModel)
    with pytest.raises(LoadError, match=r"must be a transformers model class"):
        hf.from_pretrained(tmp_path / "a", model_class="LlamaForCausalLM")  # type: ignore[arg-type]


def test_from_pretrained_refuses_a_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(LoadError, match=r"not a directory with a config.json"):
        hf.from_pretrained(tmp_path / "nope")


def test_from_pretrained_refuses_the_weights_of_another_model(tmp_path: Path) -> None:
    hf.save_pretrained(llama(), tmp_path / "a")
    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=V,
                                                                n_positions=64))
    hf.save_pretrained(gpt2, tmp_path / "g")
    (tmp_path / "mix").mkdir()
    (tmp_path / "mix" / "config.json").write_bytes((tmp_path / "a" / "config.json").read_bytes())
    (tmp_path / "mix" / "model.safetensors").write_bytes((tmp_path / "g" / "model.safetensors").read_bytes())
    with pytest.raises(LoadError, match=r"lacks 21 tensors .* belong to another model"):
        hf.from_pretrained(tmp_path / "mix")


# ----- distill -------------------------------------------------------------------------------------
def _batches() -> list[dict[str, torch.Tensor]]:
    return [{"input_ids": ids()}]


@pytest.mark.parametrize(("teacher", "match"), [
    ("self", r"teacher is the student itself"),
    ("shallow", r"share .* parameters"),
    ("meta", r"move both to one device"),
    ("vocab", r"vocabulary has 64 tokens and the teacher's 80"),
], ids=["self", "shallow_copy", "device", "vocab"])
def test_distill_checks_the_teacher(teacher: str, match: str) -> None:
    student = llama()
    other = {"self": student, "shallow": copy.copy(student), "meta": llama().to("meta")}.get(teacher)
    if teacher == "vocab":
        torch.manual_seed(0)
        other = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=80, use_cache=False))
    refused(student, lambda: distill(student, other, _batches(), 1), SparsifyError, match)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"lr": 0.0}, r"lr must be a number > 0"),
    ({"lr": -1.0}, r"lr must be a number > 0"),
    ({"lr": float("nan")}, r"lr must be a number > 0"),
    ({"temperature": float("nan")}, r"temperature > 0"),
], ids=["lr0", "lr_negative", "lr_nan", "temperature_nan"])
def test_distill_checks_its_numbers(kwargs: dict[str, Any], match: str) -> None:
    student, teacher = llama(), llama()
    refused(student, lambda: distill(student, teacher, _batches(), 1, **kwargs), SparsifyError, match)


@pytest.mark.parametrize(("batch", "match"), [
    ({"input_ids": ids()[0]}, r"shape \(batch, tokens\)"),
    ({"input_ids": ids().float()}, r"integer token ids"),
    ({"input_ids": ids()[:, :0]}, r"hold no token"),
    ({"input_ids": ids(), "attention_mask": torch.ones(2, 3, dtype=torch.long)}, r"attention_mask must have"),
], ids=["1d", "float", "empty", "mask_shape"])
def test_distill_checks_its_batches(batch: dict[str, torch.Tensor], match: str) -> None:
    student, teacher = llama(), llama()
    refused(student, lambda: distill(student, teacher, [batch], 1), SparsifyError, match, inputs=[batch])


def test_distill_checks_every_batch_before_the_first_step() -> None:
    student, teacher = llama(), llama()
    batches = [{"input_ids": ids()}, {"input_ids": ids() + V}]  # the second is bad: no step may run
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-2)
    before = snapshot(student, optimizer)
    with pytest.raises(SparsifyError, match=r"token ids must be in 0\.\.63"):
        distill(student, teacher, batches, 2, optimizer=optimizer)
    assert_unchanged(before, student, optimizer)


# ----- perplexity ----------------------------------------------------------------------------------
@pytest.mark.parametrize(("tokens", "kwargs", "match"), [
    (torch.arange(16) + V, {}, r"token ids must be in 0\.\.63"),
    (torch.arange(16) - 5, {}, r"token ids must be in"),
    (torch.rand(16), {}, r"integer token ids"),
    (ids(2, 16), {}, r"one 1-D token stream"),
    (torch.arange(16), {"seq_len": 8.0}, r"needs ints seq_len"),
    (torch.arange(16), {"max_batches": 0}, r"max_batches ≥ 1"),
    (torch.arange(16).repeat(300) % V, {"seq_len": 4096}, r"longer than the model's 2048 positions"),
], ids=["oov", "negative", "float", "2d", "seq_len_float", "max_batches0", "too_long"])
def test_perplexity_checks_tokens_and_sizes(tokens: torch.Tensor, kwargs: dict[str, Any], match: str) -> None:
    model = llama(max_position_embeddings=2048)
    kwargs = {"seq_len": 8, **kwargs}
    refused(model, lambda: perplexity(model, tokens, **kwargs), SparsifyError, match)


def test_perplexity_accepts_a_single_row_batch() -> None:
    model = llama()
    stream = torch.arange(16) % V
    assert perplexity(model, stream[None], seq_len=8) == perplexity(model, stream, seq_len=8)


def test_perplexity_refuses_a_model_without_logits() -> None:
    torch.manual_seed(0)
    bert = transformers.BertModel(transformers.BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                          num_attention_heads=4, vocab_size=V)).eval()
    refused(bert, lambda: perplexity(bert, torch.arange(16), seq_len=8), SparsifyError, r"without logits")


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"batch_size": 0}, r"'batch_size': 0"),
    ({"seq_len": 0}, r"'seq_len': 0"),
    ({"seq_len": 4, "prompt_len": 8, "new_tokens": 2}, r"prompt_len=8 is longer than seq_len=4"),
], ids=["batch0", "seq0", "prompt_too_long"])
def test_throughput_checks_its_sizes(kwargs: dict[str, Any], match: str) -> None:
    from sparsify.lm.evaluate import throughput

    model = llama()
    refused(model, lambda: throughput(model, **{"seq_len": 8, "iters": 1, "warmup": 0, **kwargs}), SparsifyError, match)
