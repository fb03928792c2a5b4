"""Tiny Hugging Face decoders of many families (2 layers, hidden 64, 4 heads, 2 KV heads where the
family has them, vocab 128, no cache), for exactness sweeps. Needs ``transformers``."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

_H = {"hidden_size": 64, "num_attention_heads": 4, "intermediate_size": 128, "num_hidden_layers": 2}
_KV = {**_H, "num_key_value_heads": 2}
_GPT = {"n_embd": 64, "n_head": 4, "n_layer": 2, "n_positions": 64}

#: family → (config class, config fields); several families have fused projections split by size or
#: chunk (phi3, gpt_neox, falcon, bloom, persimmon, gpt_bigcode, mpt, codegen) or partial rotary.
CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "gpt_neox": ("GPTNeoXConfig", {**_H, "rotary_pct": 0.25}),
    "phi": ("PhiConfig", {**_KV, "partial_rotary_factor": 0.5}),
    "phi3": ("Phi3Config", {**_KV, "pad_token_id": 0}),
    "stablelm": ("StableLmConfig", {**_KV, "partial_rotary_factor": 0.25}),
    "falcon": ("FalconConfig", {"hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
                                "new_decoder_architecture": False, "multi_query": True}),
    "falcon_new": ("FalconConfig", {"hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
                                    "new_decoder_architecture": True, "num_kv_heads": 2}),
    "bloom": ("BloomConfig", {"hidden_size": 64, "n_head": 4, "n_layer": 2}),
    "gptj": ("GPTJConfig", {**_GPT, "rotary_dim": 8}),
    "codegen": ("CodeGenConfig", {**_GPT, "rotary_dim": 8, "n_ctx": 64}),
    "gpt_bigcode": ("GPTBigCodeConfig", _GPT),
    "gpt_bigcode_mha": ("GPTBigCodeConfig", {**_GPT, "multi_query": False}),
    "persimmon": ("PersimmonConfig", {**_H, "partial_rotary_factor": 0.5}),
    "olmo": ("OlmoConfig", _KV),
    "gemma": ("GemmaConfig", {**_KV, "head_dim": 16}),
    "gemma2": ("Gemma2Config", {**_KV, "head_dim": 16, "sliding_window": 4}),
    "cohere": ("CohereConfig", _KV),
    "qwen2": ("Qwen2Config", _KV),
    "starcoder2": ("Starcoder2Config", _KV),
    "mpt": ("MptConfig", {"d_model": 64, "n_heads": 4, "n_layers": 2, "expansion_ratio": 2, "max_seq_len": 64}),
    "gpt2": ("GPT2Config", _GPT),
    "llama": ("LlamaConfig", _KV),
    "mistral": ("MistralConfig", _KV),
}


def tiny_causal_lm(family: str, dtype: torch.dtype = torch.float64, seed: int = 0) -> tuple[nn.Module, dict]:
    """(a tiny causal LM of ``family`` in eval mode, example inputs {"input_ids": (2, 8)})."""
    import transformers

    if family not in CONFIGS:
        raise KeyError(f"unknown family {family!r}; known: {sorted(CONFIGS)}")
    cls, fields = CONFIGS[family]
    config = getattr(transformers, cls)(vocab_size=128, use_cache=False, **fields)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval().to(dtype)
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(seed + 1))
    return model, {"input_ids": ids}


def phi3() -> tuple[nn.Module, dict]:
    """Phi-3: q|k|v fused in one projection and split by slicing (the case of issue #21)."""
    return tiny_causal_lm("phi3")
