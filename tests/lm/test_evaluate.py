"""sparsify.lm.evaluate on CPU with tiny models: perplexity matches HF's loss, speed and memory report, lm-eval hook."""

from __future__ import annotations

import math
import sys
import types

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from sparsify.errors import SparsifyError
from sparsify.lm import lm_eval_tasks, peak_memory, perplexity, throughput


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).double().eval()


class Uniform(torch.nn.Module):
    """Logits that are all equal: every token has probability 1 / vocab."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab
        self.scale = torch.nn.Parameter(torch.zeros(()))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.scale.expand(*input_ids.shape, self.vocab)


def test_perplexity_is_exp_of_hf_loss_on_the_same_windows(model):
    tokens = torch.randint(97, (5 * 16 + 7,), generator=torch.Generator().manual_seed(1))
    result = perplexity(model, tokens, seq_len=16, batch_size=2)
    windows = tokens[: 5 * 16].view(5, 16)
    with torch.no_grad():
        losses = [model(input_ids=w[None], labels=w[None]).loss.item() for w in windows]
    assert result["tokens"] == 5 * 15
    assert result["nll"] == pytest.approx(sum(losses) / 5, rel=1e-6)
    assert result["ppl"] == pytest.approx(math.exp(sum(losses) / 5), rel=1e-6)
    assert perplexity(model, tokens.numpy().astype(np.uint16), seq_len=16, batch_size=3)["ppl"] == \
        pytest.approx(result["ppl"], rel=1e-6)


def test_max_batches_limits_the_windows(model):
    tokens = torch.randint(97, (6 * 8,), generator=torch.Generator().manual_seed(2))
    assert perplexity(model, tokens, seq_len=8, batch_size=2, max_batches=1)["tokens"] == 2 * 7


def test_uniform_logits_give_the_vocabulary_size():
    result = perplexity(Uniform(50), list(range(50)) * 4, seq_len=10, batch_size=4)
    assert result["ppl"] == pytest.approx(50.0, rel=1e-6)  # log-softmax in float32
    assert result["tokens"] == 20 * 9


def test_perplexity_restores_training_mode_and_refuses_short_streams(model):
    model.train()
    perplexity(model, torch.arange(32) % 97, seq_len=16)
    assert model.training
    model.eval()
    with pytest.raises(SparsifyError, match="fewer than one window"):
        perplexity(model, torch.arange(10), seq_len=16)
    with pytest.raises(SparsifyError, match="seq_len"):
        perplexity(model, torch.arange(10), seq_len=1)


def test_throughput_reports_forward_and_generation(model):
    result = throughput(model, batch_size=2, seq_len=16, new_tokens=4, prompt_len=4, iters=1, warmup=0)
    assert result["forward_tokens_per_s"] > 0 and result["forward_ms"] > 0
    assert result["generate_tokens_per_s"] > 0
    with pytest.raises(SparsifyError, match="vocab_size"):
        throughput(Uniform(5), iters=1)  # no .config to read the vocabulary from


def test_peak_memory_counts_weights_and_is_none_off_cuda(model):
    result = peak_memory(model)
    assert result["weight_bytes"] == sum(p.numel() * 8 for p in model.parameters()) + \
        sum(b.numel() * b.element_size() for b in model.buffers())
    assert result["peak_bytes"] is None


def test_lm_eval_hook_explains_a_missing_install(model, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(SparsifyError, match="pip install lm-eval"):
        lm_eval_tasks(model, None, ["hellaswag"])


def test_lm_eval_hook_wraps_the_model_and_returns_results(model, monkeypatch):
    calls = {}

    class HFLM:
        def __init__(self, pretrained, tokenizer, batch_size):
            calls["wrapped"] = (pretrained, tokenizer, batch_size)

    def simple_evaluate(model, tasks, limit, **kwargs):
        calls["evaluate"] = (model, tasks, limit, kwargs)
        return {"results": {"piqa": {"acc": 0.5}}}

    package = types.ModuleType("lm_eval")
    package.simple_evaluate = simple_evaluate
    models_module, huggingface = types.ModuleType("lm_eval.models"), types.ModuleType("lm_eval.models.huggingface")
    huggingface.HFLM = HFLM
    for name, module in [("lm_eval", package), ("lm_eval.models", models_module),
                         ("lm_eval.models.huggingface", huggingface)]:
        monkeypatch.setitem(sys.modules, name, module)
    assert lm_eval_tasks(model, "tok", ("piqa",), batch_size=4, limit=10, num_fewshot=0) == {"piqa": {"acc": 0.5}}
    assert calls["wrapped"] == (model, "tok", 4)
    assert calls["evaluate"][1:] == (["piqa"], 10, {"num_fewshot": 0})
    with pytest.raises(SparsifyError, match="non-empty list"):
        lm_eval_tasks(model, "tok", "piqa")


@pytest.mark.gpu
def test_speed_and_memory_on_cuda(model):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    cuda = LlamaForCausalLM(model.config).cuda().eval()
    memory = peak_memory(cuda, batch_size=4, seq_len=32)
    assert memory["peak_bytes"] >= memory["weight_bytes"] > 0
    speed = throughput(cuda, batch_size=4, seq_len=32, new_tokens=8, iters=3, warmup=1)
    assert speed["forward_tokens_per_s"] > 0 and speed["generate_tokens_per_s"] > 0
    tokens = torch.randint(97, (4 * 32,))
    assert perplexity(cuda, tokens, seq_len=32)["ppl"] == pytest.approx(
        perplexity(cuda.cpu(), tokens, seq_len=32)["ppl"], rel=1e-3)
