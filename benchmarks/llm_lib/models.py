"""The two decoders sparsify prunes, as standard Hugging Face classes built from configs.

``llama``: LLaMA-style (GQA 8 query / 2 KV heads, RoPE, RMSNorm, SwiGLU), hidden 512, 8 layers,
intermediate 1408, tied embeddings: 26.7 M parameters with the 8192-token vocabulary (53 MB in bf16).
``moe``: Mixtral-style, same attention, 8 experts of intermediate 192, top-2 routing: 28.4 M
parameters, 14.2 M active per token (10 M without the embedding); the router's balance loss is asked for
in training only (``output_router_logits=True`` at the call), so the saved config runs pruned models too.
``tiny=True`` gives the same classes at test sizes.
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM, PreTrainedModel

from benchmarks.llm_lib.tokens import EOS_ID

MODELS = ("llama", "moe")


def _common(vocab_size: int, max_positions: int, tiny: bool) -> dict:
    size = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2) if tiny else \
        dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2)
    return dict(vocab_size=vocab_size, max_position_embeddings=max_positions, rms_norm_eps=1e-5, rope_theta=10000.0,
                hidden_act="silu", tie_word_embeddings=True, bos_token_id=EOS_ID, eos_token_id=EOS_ID,
                pad_token_id=EOS_ID, initializer_range=0.02, attention_dropout=0.0, **size)


def llama_config(vocab_size: int = 8192, *, max_positions: int = 1024, tiny: bool = False) -> LlamaConfig:
    return LlamaConfig(intermediate_size=128 if tiny else 1408, **_common(vocab_size, max_positions, tiny))


def moe_config(vocab_size: int = 8192, *, max_positions: int = 1024, tiny: bool = False) -> MixtralConfig:
    return MixtralConfig(intermediate_size=32 if tiny else 192, num_local_experts=8, num_experts_per_tok=2,
                         router_aux_loss_coef=0.01, output_router_logits=False, sliding_window=None,
                         **_common(vocab_size, max_positions, tiny))


def build_model(kind: str, vocab_size: int = 8192, *, tiny: bool = False, seed: int = 0,
                max_positions: int = 1024) -> PreTrainedModel:
    """A freshly initialised decoder of ``kind`` ("llama" or "moe"), deterministic for ``seed``."""
    if kind not in MODELS:
        raise ValueError(f"unknown model {kind!r}: choose one of {MODELS}")
    config = (llama_config if kind == "llama" else moe_config)(vocab_size, max_positions=max_positions, tiny=tiny)
    torch.manual_seed(seed)
    cls = LlamaForCausalLM if kind == "llama" else MixtralForCausalLM
    return cls._from_config(config, attn_implementation="sdpa")


def parameter_counts(model: PreTrainedModel) -> dict[str, int]:
    """Total parameters (tied weights once), the embedding's, and those one token uses (MoE: top-k experts)."""
    total = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings().weight.numel()
    config = model.config
    experts = getattr(config, "num_local_experts", None)
    active = total
    if experts:
        per_expert = 3 * config.hidden_size * config.intermediate_size
        active = total - config.num_hidden_layers * (experts - config.num_experts_per_tok) * per_expert
    return {"total": total, "embedding": embedding, "active": active}
