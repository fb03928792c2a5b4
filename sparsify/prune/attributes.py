"""Re-derive module attributes (in_channels, num_features, …) from sliced parameter shapes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

AttributeSync = Callable[[nn.Module, dict[str, Any]], None]
_SYNCS: dict[type[nn.Module] | str, AttributeSync] = {}


def register_attribute_sync(cls: type[nn.Module] | str) -> Callable[[AttributeSync], AttributeSync]:
    """Decorator: ``fn(module, old_attributes)`` fixes ``cls`` attributes after its tensors are sliced.

    ``cls`` may be a dotted class name (``"transformers.pytorch_utils.Conv1D"``: no import needed).
    A module whose own tensors are untouched is synced too when a descendant's are (an attention
    module's head counts follow its q/k/v projections), after its descendants."""

    def deco(fn: AttributeSync) -> AttributeSync:
        _SYNCS[cls] = fn
        return fn

    return deco


def _sync_of(module: nn.Module) -> AttributeSync | None:
    for cls in type(module).__mro__:
        for key in (cls, f"{cls.__module__}.{cls.__qualname__}"):
            if key in _SYNCS:
                return _SYNCS[key]
    return None


def sync_attributes(module: nn.Module, old: dict[str, Any]) -> None:
    fn = _sync_of(module)
    if fn is not None:
        fn(module, old)


def modules_to_sync(model: nn.Module, touched: list[str]) -> list[str]:
    """``touched`` plus their ancestors that have an attribute sync, deepest first."""
    names = dict.fromkeys(touched)
    for name in touched:
        parts = name.split(".") if name else []
        for k in range(len(parts) - 1, -1, -1):
            parent = ".".join(parts[:k])
            if parent not in names and _sync_of(model.get_submodule(parent)) is not None:
                names[parent] = None
    return sorted(names, key=lambda n: -(n.count(".") + 1 if n else 0))


@register_attribute_sync(nn.modules.conv._ConvNd)
def _conv(m: nn.modules.conv._ConvNd, old: dict[str, Any]) -> None:
    w = m.weight
    per_group_out = old["out_channels"] // old["groups"]
    if m.transposed:
        m.in_channels = w.shape[0]
        m.out_channels = w.shape[1] * m.groups
    else:
        m.out_channels = w.shape[0]
        if old["groups"] > 1:
            m.groups = m.out_channels // per_group_out
        m.in_channels = w.shape[1] * m.groups


@register_attribute_sync(nn.Linear)
def _linear(m: nn.Linear, old: dict[str, Any]) -> None:
    m.out_features, m.in_features = m.weight.shape


@register_attribute_sync(nn.modules.batchnorm._NormBase)
def _norm(m: nn.modules.batchnorm._NormBase, old: dict[str, Any]) -> None:
    t = m.weight if m.weight is not None else m.running_mean
    if t is not None:
        m.num_features = t.shape[0]


@register_attribute_sync(nn.GroupNorm)
def _group_norm(m: nn.GroupNorm, old: dict[str, Any]) -> None:
    per_group = old["num_channels"] // old["num_groups"]
    m.num_channels = m.weight.shape[0]
    m.num_groups = m.num_channels // per_group


@register_attribute_sync(nn.LayerNorm)
def _layer_norm(m: nn.LayerNorm, old: dict[str, Any]) -> None:
    if m.weight is not None:
        m.normalized_shape = tuple(m.weight.shape)


if hasattr(nn, "RMSNorm"):
    register_attribute_sync(nn.RMSNorm)(_layer_norm)


@register_attribute_sync(nn.Embedding)
def _embedding(m: nn.Embedding, old: dict[str, Any]) -> None:
    m.num_embeddings, m.embedding_dim = m.weight.shape


@register_attribute_sync(nn.PReLU)
def _prelu(m: nn.PReLU, old: dict[str, Any]) -> None:
    m.num_parameters = m.weight.shape[0]


@register_attribute_sync(nn.RNNBase)
def _rnn(m: nn.RNNBase, old: dict[str, Any]) -> None:
    gates = {"LSTM": 4, "GRU": 3}.get(m.mode, 1)
    m.hidden_size = m.weight_hh_l0.shape[0] // gates
    m.input_size = m.weight_ih_l0.shape[1]
    if m.proj_size:
        m.proj_size = m.weight_hr_l0.shape[0]
    m._init_flat_weights()  # forward() reads _flat_weights; surgery replaced the Parameters behind it


# ----- Hugging Face attention (by dotted name: no transformers import) --------------------------------
@register_attribute_sync("transformers.pytorch_utils.Conv1D")
def _hf_conv1d(m: nn.Module, old: dict[str, Any]) -> None:
    m.nx, m.nf = m.weight.shape


@register_attribute_sync("transformers.models.gpt2.modeling_gpt2.GPT2Attention")
def _gpt2_attention(m: nn.Module, old: dict[str, Any]) -> None:
    """forward() splits c_attn's output by ``split_size`` (q|k|v, or k|v for cross-attention)."""
    m.split_size = m.c_attn.weight.shape[1] // (2 if m.is_cross_attention else 3)
    m.embed_dim = m.split_size  # the attention's inner width (HF ties it to hidden_size before pruning)
    m.num_heads = m.split_size // m.head_dim


@register_attribute_sync("transformers.models.gpt2.modeling_gpt2.GPT2Model")
def _gpt2_model(m: nn.Module, old: dict[str, Any]) -> None:
    m.embed_dim = m.wte.weight.shape[1]


def _bert_attention(m: nn.Module, old: dict[str, Any]) -> None:
    m.all_head_size = m.query.weight.shape[0]
    m.num_attention_heads = m.all_head_size // m.attention_head_size


register_attribute_sync("transformers.models.bert.modeling_bert.BertSelfAttention")(_bert_attention)
register_attribute_sync("transformers.models.bert.modeling_bert.BertCrossAttention")(_bert_attention)


@register_attribute_sync("transformers.models.llama.modeling_llama.LlamaAttention")
def _llama_attention(m: nn.Module, old: dict[str, Any]) -> None:
    """Head counts are q_proj/k_proj rows // head_dim; repeat_kv reads ``num_key_value_groups``."""
    heads, kv_heads = m.q_proj.weight.shape[0] // m.head_dim, m.k_proj.weight.shape[0] // m.head_dim
    m.num_key_value_groups = heads // max(kv_heads, 1)


for _name in ("mistral.modeling_mistral.MistralAttention", "qwen2.modeling_qwen2.Qwen2Attention",
              "qwen3.modeling_qwen3.Qwen3Attention"):  # the same attention code as LLaMA's
    register_attribute_sync(f"transformers.models.{_name}")(_llama_attention)
