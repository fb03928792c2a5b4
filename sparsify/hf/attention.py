"""Hugging Face attention whose head_dim slots can be pruned (``explicit_attention_``).

Hugging Face attention writes ``view(..., -1, self.head_dim)`` (one ``head_dim`` shapes q, k and v),
so the tracer sees whole heads as its structures and the head_dim as a barrier. ``explicit_attention_``
turns every attention module of a supported family into a subclass (same parameters, same state-dict
keys plus LLaMA's ``inv_freq``, numerically identical) that writes a constant head count,
``view(b, s, num_heads, -1)``: the layout analysis then makes the head_dim slots the structures
(``kind="head_dim"``, see ``graph/rules/head_dim.py``), q/k slots and v/o slots as two groups per
layer (GPT-2's fused ``c_attn``: one group, q/k structures then v structures). The subclass

- passes the ORIGINAL scale (``scaling``, 1/sqrt(original head_dim), a float attribute), so removing
  q/k slots does not change it;
- keeps ``head_dim`` (q/k slots per head) and ``v_head_dim`` (v/o slots per head) in sync with the
  weights after pruning (an attribute sync);
- LLaMA: computes its own rotary tables from a persistent copy of the model's ``inv_freq`` (one
  frequency per rotary pair) and the position ids, so the pruner removes a pair's frequency together
  with the pair's q/k slots (``cat((freqs, freqs))`` couples slot j with j + d/2, like ``rotate_half``);
  the model-level ``rotary_emb`` then returns None (its tables would be unused);
- GPT-2: splits ``c_attn`` into ``[q, k, v]`` widths read from synced attributes (q/k and v may differ).

Whole heads are then a barrier (one partition per channel space): prune heads first (adapter
``heads``), then swap, then prune slots (``HeadsConfig(head_dim=True)``). Supported: LLaMA
(``LlamaAttention``: GQA, RMSNorm, rotary of a static rope type), GPT-2 self-attention, BERT
self-attention. Save/load with ``sparsify.hf.save_pretrained`` / ``sparsify.hf.from_pretrained``.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from sparsify._compat import import_torchvision

with contextlib.suppress(ModuleNotFoundError):
    import_torchvision()  # transformers imports torchvision; the shim must come first

from transformers.cache_utils import EncoderDecoderCache
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.bert import modeling_bert
from transformers.models.gpt2 import modeling_gpt2
from transformers.models.llama import modeling_llama

from sparsify.errors import SparsifyError
from sparsify.graph.module_types import register_module_type
from sparsify.hf.resize import resize_conv1d as _conv1d
from sparsify.hf.resize import resize_linear as _linear

#: rope types whose inverse frequencies change with the sequence length (not a fixed buffer)
_DYNAMIC_ROPE = ("dynamic", "longrope")


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    """LLaMA's rotate_half; the bounds follow the width (x.shape[-1] // 2), slots j and j + d/2 pair up."""
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def _pop_cache(cache: Any, kwargs: dict[str, Any]) -> Any:
    return kwargs.pop("past_key_values", None) if cache is None else cache


class SlotLlamaAttention(modeling_llama.LlamaAttention):
    """``LlamaAttention`` with a constant head count, an explicit scale and its own rotary frequencies."""

    num_heads: int
    num_kv_heads: int
    v_head_dim: int
    rope_scaling: float

    def forward(self, hidden_states: torch.Tensor, position_embeddings: Any = None,
                attention_mask: torch.Tensor | None = None, cache: Any = None,
                position_ids: torch.Tensor | None = None, **kwargs: Any) -> tuple[torch.Tensor, Any]:
        cache = _pop_cache(cache, kwargs)
        if position_ids is None:
            raise SparsifyError(f"{type(self).__name__} computes its rotary tables from position_ids, which its "
                                "decoder layer did not pass; call the whole model (LlamaModel passes them)")
        input_shape = hidden_states.shape[:-1]
        q = self.q_proj(hidden_states).view(*input_shape, self.num_heads, -1).transpose(1, 2)
        k = self.k_proj(hidden_states).view(*input_shape, self.num_kv_heads, -1).transpose(1, 2)
        v = self.v_proj(hidden_states).view(*input_shape, self.num_kv_heads, -1).transpose(1, 2)
        # the model's rotary tables, restricted to this layer's kept pairs (same ops as LlamaRotaryEmbedding)
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=hidden_states.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * self.rope_scaling).to(dtype=hidden_states.dtype).unsqueeze(1)
        sin = (emb.sin() * self.rope_scaling).to(dtype=hidden_states.dtype).unsqueeze(1)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx, kwargs=kwargs)
        interface = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation,
                                                          modeling_llama.eager_attention_forward)
        out, weights = interface(self, q, k, v, attention_mask, dropout=0.0 if not self.training else
                                 self.attention_dropout, scaling=self.scaling, position_ids=position_ids, **kwargs)
        out = out.reshape(*input_shape, -1).contiguous()
        return self.o_proj(out), weights


class SlotGPT2Attention(modeling_gpt2.GPT2Attention):
    """GPT-2 self-attention with a constant head count; ``c_attn`` splits into q, k, v of synced widths."""

    v_head_dim: int

    def forward(self, hidden_states: torch.Tensor, cache: Any = None, attention_mask: torch.Tensor | None = None,
                encoder_hidden_states: torch.Tensor | None = None, encoder_attention_mask: Any = None,
                output_attentions: bool | None = False, **kwargs: Any) -> tuple[torch.Tensor, Any]:
        cache = _pop_cache(cache, kwargs)
        if encoder_hidden_states is not None:
            raise SparsifyError("SlotGPT2Attention is self-attention only (cross-attention is not supported)")
        qk, vw = self.num_heads * self.head_dim, self.num_heads * self.v_head_dim
        q, k, v = self.c_attn(hidden_states).split([qk, qk, vw], dim=2)
        input_shape = hidden_states.shape[:-1]
        q, k, v = (t.view(*input_shape, self.num_heads, -1).transpose(1, 2) for t in (q, k, v))
        if cache is not None:
            current = cache.self_attention_cache if isinstance(cache, EncoderDecoderCache) else cache
            k, v = current.update(k, v, self.layer_idx, kwargs=kwargs)
        interface = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation,
                                                          modeling_gpt2.eager_attention_forward)
        out, weights = interface(self, q, k, v, attention_mask, dropout=self.attn_dropout.p if self.training else
                                 0.0, scaling=self.scaling, **kwargs)
        out = out.reshape(*out.shape[:-2], -1).contiguous()
        return self.resid_dropout(self.c_proj(out)), weights


class SlotBertSelfAttention(modeling_bert.BertSelfAttention):
    """BERT self-attention with a constant head count; ``attention_head_size`` is the q/k slots per head."""

    v_head_dim: int

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, cache: Any = None,
                **kwargs: Any) -> tuple[torch.Tensor, Any]:
        cache = _pop_cache(cache, kwargs)
        input_shape = hidden_states.shape[:-1]
        q, k, v = (p(hidden_states).view(*input_shape, self.num_attention_heads, -1).transpose(1, 2)
                   for p in (self.query, self.key, self.value))
        if cache is not None:
            current = cache.self_attention_cache if isinstance(cache, EncoderDecoderCache) else cache
            k, v = current.update(k, v, self.layer_idx, kwargs=kwargs)
        interface = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation,
                                                          modeling_bert.eager_attention_forward)
        out, weights = interface(self, q, k, v, attention_mask, dropout=0.0 if not self.training else
                                 self.dropout.p, scaling=self.scaling, **kwargs)
        return out.reshape(*input_shape, -1).contiguous(), weights


class UnusedRotaryEmbedding(modeling_llama.LlamaRotaryEmbedding):
    """The model-level rotary embedding once every layer computes its own tables: returns None (no dead
    compute, and no buffer-only channel group for the tracer to offer)."""

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> None:  # type: ignore[override]
        return None


SLOT_CLASSES = (SlotLlamaAttention, SlotGPT2Attention, SlotBertSelfAttention)


def _per_head(what: str, width: int, heads: int) -> int:
    if heads <= 0 or width % heads:
        raise SparsifyError(f"{what} has {width} channels, not a whole number per head for {heads} heads")
    return width // heads


# ----- module types: synced sizes, and attribute syncs (head_dim / v_head_dim follow the weights) -------
def _sync_llama(m: SlotLlamaAttention, old: dict[str, Any]) -> None:
    m.head_dim = m.q_proj.weight.shape[0] // m.num_heads
    m.v_head_dim = m.v_proj.weight.shape[0] // m.num_kv_heads


def _sync_gpt2(m: SlotGPT2Attention, old: dict[str, Any]) -> None:
    v = m.c_proj.weight.shape[0]  # Conv1D weight: (in, out)
    qk = (m.c_attn.weight.shape[1] - v) // (2 * m.num_heads)
    if not qk or not v:  # one group holds both (the fused c_attn): the surgery's emptiness check misses this
        raise SparsifyError(f"the plan removes every {'q/k' if not qk else 'v'} slot of a GPT-2 attention layer; "
                            "keep at least one q/k and one v structure of its head_dim group")
    m.v_head_dim = v // m.num_heads
    m.head_dim = qk
    m.split_size = m.embed_dim = v


def _sync_bert(m: SlotBertSelfAttention, old: dict[str, Any]) -> None:
    m.attention_head_size = m.query.weight.shape[0] // m.num_attention_heads
    m.v_head_dim = m.value.weight.shape[0] // m.num_attention_heads
    m.all_head_size = m.value.weight.shape[0]


register_module_type(SlotLlamaAttention, synced_sizes=True, sync=_sync_llama)
register_module_type(SlotGPT2Attention, synced_sizes=True, sync=_sync_gpt2)
register_module_type(SlotBertSelfAttention, synced_sizes=True, sync=_sync_bert)


# ----- reading and resizing (sparsify.hf) -----------------------------------------------------------
def read(attn: nn.Module) -> dict[str, Any]:
    """A swapped attention's widths, read from its weights: heads, key/value heads, head_dim (q/k slots
    per head), v_head_dim, and the original scale."""
    if isinstance(attn, SlotLlamaAttention):
        h, kv = attn.num_heads, attn.num_kv_heads
        d = _per_head("q_proj", attn.q_proj.weight.shape[0], h)
        if attn.k_proj.weight.shape[0] != kv * d:
            raise SparsifyError(f"k_proj has {attn.k_proj.weight.shape[0]} rows, q_proj {h * d}: q and k need the "
                                f"same head_dim ({kv} key/value heads of {d})")
        dv = _per_head("v_proj", attn.v_proj.weight.shape[0], kv)
        if attn.o_proj.weight.shape[1] != h * dv:
            raise SparsifyError(f"o_proj has {attn.o_proj.weight.shape[1]} columns, not {h} heads × {dv}")
    elif isinstance(attn, SlotGPT2Attention):
        h = kv = attn.num_heads
        dv = _per_head("c_proj", attn.c_proj.weight.shape[0], h)
        qk = attn.c_attn.weight.shape[1] - h * dv
        d = _per_head("c_attn (q|k part)", qk // 2, h) if qk % 2 == 0 else -1
        if d < 0:
            raise SparsifyError(f"c_attn has {attn.c_attn.weight.shape[1]} outputs: not q|k|v with v of {h * dv}")
    elif isinstance(attn, SlotBertSelfAttention):
        h = kv = attn.num_attention_heads
        d = _per_head("query", attn.query.weight.shape[0], h)
        if attn.key.weight.shape[0] != h * d:
            raise SparsifyError(f"key has {attn.key.weight.shape[0]} rows, query {h * d}: q and k must match")
        dv = _per_head("value", attn.value.weight.shape[0], h)
    else:
        raise SparsifyError(f"{type(attn).__name__} is not an attention module of sparsify.hf.attention")
    out = {"num_attention_heads": h, "num_key_value_heads": kv, "head_dim": d, "v_head_dim": dv,
           "scaling": float(attn.scaling)}
    if isinstance(attn, SlotLlamaAttention):
        out["rope_scaling"] = float(attn.rope_scaling)
    return out


def resize(attn: nn.Module, heads: int, kv_heads: int, head_dim: int, v_head_dim: int, scaling: float,
           rope_scaling: float | None = None, out: nn.Module | None = None) -> None:
    """Give a swapped attention these widths (new, uninitialised tensors where a shape changes) and the
    original scales. ``out``: BERT's output projection (``attention.output.dense``)."""
    attn.scaling = float(scaling)
    if isinstance(attn, SlotLlamaAttention):
        if rope_scaling is not None:
            attn.rope_scaling = float(rope_scaling)
        attn.num_heads, attn.num_kv_heads = heads, kv_heads
        attn.num_key_value_groups = heads // kv_heads
        _linear(attn.q_proj, out=heads * head_dim)
        _linear(attn.k_proj, out=kv_heads * head_dim)
        _linear(attn.v_proj, out=kv_heads * v_head_dim)
        _linear(attn.o_proj, inp=heads * v_head_dim)
        if attn.inv_freq.shape[0] != head_dim // 2:
            attn.inv_freq = torch.empty((head_dim // 2,), dtype=attn.inv_freq.dtype, device=attn.inv_freq.device)
        attn.head_dim, attn.v_head_dim = head_dim, v_head_dim
    elif isinstance(attn, SlotGPT2Attention):
        attn.num_heads = heads
        _conv1d(attn.c_attn, out=heads * (2 * head_dim + v_head_dim))
        _conv1d(attn.c_proj, inp=heads * v_head_dim)
        attn.head_dim, attn.v_head_dim = head_dim, v_head_dim
        attn.split_size = attn.embed_dim = heads * v_head_dim
    elif isinstance(attn, SlotBertSelfAttention):
        attn.num_attention_heads = heads
        _linear(attn.query, out=heads * head_dim)
        _linear(attn.key, out=heads * head_dim)
        _linear(attn.value, out=heads * v_head_dim)
        if out is not None:
            _linear(out, inp=heads * v_head_dim)
        attn.attention_head_size, attn.v_head_dim, attn.all_head_size = head_dim, v_head_dim, heads * v_head_dim
    else:
        raise SparsifyError(f"{type(attn).__name__} is not an attention module of sparsify.hf.attention")


# ----- the swap ---------------------------------------------------------------------------------------
def _plan(model: nn.Module) -> list[tuple[nn.Module, type, str]]:
    """(module, its new class, its name) for every attention module to swap; raises on unsupported ones."""
    base = getattr(model, "base_model", model)
    found: list[tuple[nn.Module, type, str]] = []
    swapped = False
    for name, m in model.named_modules():
        cls = type(m)
        if isinstance(m, SLOT_CLASSES):
            swapped = True
            continue
        if cls is modeling_llama.LlamaAttention:
            rotary = getattr(base, "rotary_emb", None)
            if rotary is None or not isinstance(getattr(rotary, "inv_freq", None), torch.Tensor):
                raise SparsifyError(f"'{name}' is a LlamaAttention, but the model has no rotary_emb with an "
                                    "inv_freq buffer (call explicit_attention_ on the LlamaForCausalLM/LlamaModel)")
            if getattr(rotary, "rope_type", "default") in _DYNAMIC_ROPE:
                raise SparsifyError(f"rope_type {rotary.rope_type!r} recomputes its frequencies with the sequence "
                                    "length; head_dim pruning supports static rope types only")
            found.append((m, SlotLlamaAttention, name))
        elif cls is modeling_gpt2.GPT2Attention:
            if m.is_cross_attention:
                raise SparsifyError(f"'{name}' is GPT-2 cross-attention; only self-attention is supported")
            if m.reorder_and_upcast_attn:
                raise SparsifyError(f"'{name}' uses reorder_and_upcast_attn (a baddbmm path); set "
                                    "config.reorder_and_upcast_attn=False")
            found.append((m, SlotGPT2Attention, name))
        elif cls is modeling_bert.BertSelfAttention:
            found.append((m, SlotBertSelfAttention, name))
        elif "Attention" in cls.__name__ and cls is not modeling_bert.BertAttention:
            raise SparsifyError(f"'{name}' is a {cls.__module__}.{cls.__qualname__}, which explicit_attention_ does "
                                "not support (LlamaAttention, GPT2Attention (self-attention), BertSelfAttention); "
                                "the model was left unchanged")
    if not found and not swapped:
        raise SparsifyError(f"{type(model).__name__} has no attention module that explicit_attention_ supports "
                            "(LlamaAttention, GPT2Attention, BertSelfAttention)")
    return found


def explicit_attention_(model: nn.Module) -> nn.Module:
    """Swap (in place) every supported Hugging Face attention module of ``model`` for its sparsify subclass
    (same parameters and state-dict keys, plus LLaMA's per-layer ``inv_freq`` buffer; identical outputs),
    whose head_dim slots are prunable. Returns
    ``model``. An unsupported attention class anywhere in the model raises ``SparsifyError`` before
    anything is changed. Modules already swapped are left as they are."""
    plan = _plan(model)
    base = getattr(model, "base_model", model)
    for m, cls, _ in plan:
        if cls is SlotLlamaAttention:
            rotary = base.rotary_emb
            m.num_heads = m.q_proj.weight.shape[0] // m.head_dim
            m.num_kv_heads = m.k_proj.weight.shape[0] // m.head_dim
            m.v_head_dim = m.head_dim
            m.rope_scaling = float(rotary.attention_scaling)
            m.register_buffer("inv_freq", rotary.inv_freq.detach().clone(), persistent=True)
        elif cls is SlotGPT2Attention:
            m.num_heads = m.c_proj.weight.shape[0] // m.head_dim
            m.v_head_dim = m.head_dim
        else:
            m.num_attention_heads = m.query.weight.shape[0] // m.attention_head_size
            m.v_head_dim = m.attention_head_size
        m.scaling = float(m.scaling)
        m.__class__ = cls
    if any(cls is SlotLlamaAttention for _, cls, _ in plan):
        base.rotary_emb.__class__ = UnusedRotaryEmbedding
    return model
