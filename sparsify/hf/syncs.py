"""Hugging Face module types, registered by dotted name (transformers is not imported).

Each class is declared with synced sizes (its forward() computes every view/reshape/split size from
tensor shapes or from attributes kept in sync: GPT-2's ``split_size``, Conv1D's ``nf``; checked by
reading their code, transformers 5; another class stays conservative) and, where its attributes
follow the weights, an attribute sync. ``sparsify.extend`` imports this module, so the registrations
hold whenever sparsify is imported.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from sparsify.graph.module_types import register_module_type
from sparsify.hf import llama_like


def _conv1d(m: nn.Module, old: dict[str, Any]) -> None:
    m.nx, m.nf = m.weight.shape


def _gpt2_attention(m: nn.Module, old: dict[str, Any]) -> None:
    """forward() splits c_attn's output by ``split_size`` (q|k|v, or k|v for cross-attention)."""
    m.split_size = m.c_attn.weight.shape[1] // (2 if m.is_cross_attention else 3)
    m.embed_dim = m.split_size  # the attention's inner width (HF ties it to hidden_size before pruning)
    m.num_heads = m.split_size // m.head_dim


def _gpt2_model(m: nn.Module, old: dict[str, Any]) -> None:
    m.embed_dim = m.wte.weight.shape[1]


def _bert_attention(m: nn.Module, old: dict[str, Any]) -> None:
    m.all_head_size = m.query.weight.shape[0]
    m.num_attention_heads = m.all_head_size // m.attention_head_size


def _llama_attention(m: nn.Module, old: dict[str, Any]) -> None:
    """Head counts are q_proj/k_proj rows // head_dim; repeat_kv reads ``num_key_value_groups``."""
    heads, kv_heads = m.q_proj.weight.shape[0] // m.head_dim, m.k_proj.weight.shape[0] // m.head_dim
    m.num_key_value_groups = heads // max(kv_heads, 1)


_MODELS = "transformers.models"
register_module_type("transformers.pytorch_utils.Conv1D", synced_sizes=True, sync=_conv1d)
register_module_type(f"{_MODELS}.gpt2.modeling_gpt2.GPT2Attention", synced_sizes=True, sync=_gpt2_attention)
register_module_type(f"{_MODELS}.gpt2.modeling_gpt2.GPT2Model", synced_sizes=True, sync=_gpt2_model)
register_module_type(f"{_MODELS}.bert.modeling_bert.BertSelfAttention", synced_sizes=True, sync=_bert_attention)
register_module_type(f"{_MODELS}.bert.modeling_bert.BertCrossAttention", sync=_bert_attention)
for _name in llama_like.attention_classes():  # LLaMA's attention code (the explicit list there)
    register_module_type(_name, synced_sizes=True, sync=_llama_attention)
