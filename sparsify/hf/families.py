"""Hugging Face model families: how each family's layers hold their widths, read from the weights and resized.

A ``Family`` (keyed by ``config.model_type``, ``register_family``) names the config fields of its widths,
finds the transformer layers, reads a layer's widths from its weights and resizes a layer to given
widths. gpt2, bert and the LLaMA-like families of ``sparsify.hf.llama_like`` are built in (dense layers,
and sparse-MoE layers: attention, experts' and shared-expert widths); layers whose attention was swapped by
``explicit_attention_`` (``sparsify.hf.attention``) are read and resized through their head_dim slots.
``sparsify.hf.pretrained`` uses the families to sync configs and to save and load pruned models.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from sparsify.errors import SparsifyError
from sparsify.hf import llama_like
from sparsify.hf.resize import empty_parameter as _empty
from sparsify.hf.resize import resize_conv1d as _conv1d
from sparsify.hf.resize import resize_linear as _linear
from sparsify.registry import Registry

Widths = dict[str, int]


@dataclass(frozen=True)
class Family:
    """How the layers of one model family store their widths.

    ``fields``: width name → config attribute that holds it when uniform (None: the config class has no
    such field; the width is derived, e.g. BERT's head size = hidden_size / num_attention_heads).
    ``layers``: the base model → its list of transformer layers. ``read``: a layer → its widths, read
    from the weights (raises ``SparsifyError`` where the weights fit no configuration). ``resize``:
    give a layer the widths (tensors of the new shapes, uninitialised where the shape changes) and set
    the module attributes that depend on them; a no-op on the tensors when they already fit.
    """

    fields: dict[str, str | None]
    layers: Callable[[nn.Module], nn.ModuleList]
    read: Callable[[nn.Module], Widths]
    resize: Callable[[nn.Module, Widths, Any], None]


#: Model families by ``config.model_type`` (Hugging Face spells some with hyphens: ``xlm-roberta``).
FAMILIES: Registry[Family] = Registry("model family", "Describe it with sparsify.hf.register_family(model_type, "
                                      "Family(...)).", pattern=re.compile(r"^[a-z][a-z0-9_-]*$"))


def register_family(model_type: str, family: Family, *, override: bool = False) -> None:
    """Teach ``sync_config``/``from_pretrained`` a model family (``config.model_type``); a registered
    ``model_type`` raises ``ValueError`` unless ``override=True``."""
    if not isinstance(family, Family):
        raise TypeError(f"register_family({model_type!r}, family): family must be a sparsify.hf.Family, "
                        f"got {type(family).__name__}.")
    FAMILIES.register(model_type, family, override=override)


# ----- tensors ---------------------------------------------------------------------------------
def _rows(m: nn.Module) -> int:
    return int(m.weight.shape[0])


def _cols(m: nn.Module) -> int:
    return int(m.weight.shape[1])


def _heads(what: str, width: int, head_dim: int) -> int:
    if width % head_dim:
        raise SparsifyError(f"{what} has {width} channels, not a multiple of the head size {head_dim}: no "
                            "configuration describes it. Prune attention by whole heads (adapter='heads').")
    return width // head_dim


def _same(what: str, **values: int) -> int:
    if len(set(values.values())) > 1:
        raise SparsifyError(f"{what} disagree ({', '.join(f'{k}={v}' for k, v in values.items())}); "
                            "no configuration describes such a layer. Prune them as one channel group.")
    return next(iter(values.values()))


# ----- attention with prunable head_dim slots (sparsify.hf.attention) ----------------------------
def slots_of(attn: nn.Module) -> dict[str, Any] | None:
    """A swapped attention's widths (heads, head_dim of q/k, v_head_dim, scale), else None."""
    if type(attn).__module__ != "sparsify.hf.attention":
        return None
    from sparsify.hf import attention as hf_attention

    return hf_attention.read(attn)


def _resize_slots(attn: nn.Module, heads: int, kv_heads: int, head_dim: int, out: nn.Module | None = None) -> None:
    """Resize a swapped attention's heads and q/k head_dim; its v_head_dim and scale stay."""
    from sparsify.hf import attention as hf_attention

    hf_attention.resize(attn, heads, kv_heads, head_dim, attn.v_head_dim, attn.scaling, out=out)


def attention_of(layer: nn.Module) -> tuple[nn.Module, nn.Module | None]:
    """A transformer layer's attention module (and BERT's separate output projection)."""
    for name in ("self_attn", "attn"):
        if isinstance(getattr(layer, name, None), nn.Module):
            return getattr(layer, name), None
    return layer.attention.self, layer.attention.output.dense


# ----- llama-style (sparsify.hf.llama_like) ------------------------------------------------------
def _attention_read(attn: nn.Module) -> Widths:
    slots = slots_of(attn)
    if slots is not None:
        return {k: slots[k] for k in ("num_attention_heads", "num_key_value_heads", "head_dim")}
    d = int(attn.head_dim)
    q = _same("query widths", q_proj=_rows(attn.q_proj), o_proj_in=_cols(attn.o_proj))
    kv = _same("key/value widths", k_proj=_rows(attn.k_proj), v_proj=_rows(attn.v_proj))
    h, k = _heads("q_proj", q, d), _heads("k_proj", kv, d)
    if h % k:
        raise SparsifyError(f"{h} query heads and {k} key/value heads: grouped-query attention needs a whole "
                            "number of query heads per key/value head. Prune heads with adapter='heads', "
                            "which removes whole key/value groups.")
    return {"num_attention_heads": h, "num_key_value_heads": k, "head_dim": d}


def _mlp(mlp: nn.Module) -> tuple[dict[str, tuple[nn.Module, int]], nn.Module]:
    """The MLP's input projections by name (with how many intermediate widths each holds) and its output
    projection: gate_proj, up_proj → down_proj (Arcee, Apertus, Nemotron: no gate_proj; GLM: gate|up fused
    in gate_up_proj, chunked in two; StarCoder2: c_fc → c_proj)."""
    if isinstance(getattr(mlp, "c_fc", None), nn.Module):
        return {"c_fc": (mlp.c_fc, 1)}, mlp.c_proj
    if isinstance(getattr(mlp, "gate_up_proj", None), nn.Linear):
        return {"gate_up_proj": (mlp.gate_up_proj, 2)}, mlp.down_proj
    names = ("gate_proj", "up_proj") if isinstance(getattr(mlp, "gate_proj", None), nn.Module) else ("up_proj",)
    return {n: (getattr(mlp, n), 1) for n in names}, mlp.down_proj


def _mlp_width(mlp: nn.Module, what: str = "MLP widths") -> int:
    """The intermediate width of a LLaMA-style MLP (see :func:`_mlp`), the same in all its projections."""
    ins, out = _mlp(mlp)
    for name, (m, k) in ins.items():
        if _rows(m) % k:
            raise SparsifyError(f"{name} has {_rows(m)} output channels, not {k} equal chunks; prune its chunks "
                                "as one channel group")
    return _same(what, **{n: _rows(m) // k for n, (m, k) in ins.items()}, down_proj_in=_cols(out))


def _resize_mlp(mlp: nn.Module, width: int) -> int:
    """A LLaMA-style MLP resized to ``width`` intermediate channels; returns its hidden size."""
    ins, out = _mlp(mlp)
    for m, k in ins.values():
        _linear(m, out=k * width)
    _linear(out, inp=width)
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = width
    return _rows(out)


def _llama_read(layer: nn.Module) -> Widths:
    return {"intermediate_size": _mlp_width(layer.mlp), **_attention_read(layer.self_attn)}


def _resize_head_norms(attn: nn.Module, heads: dict[str, int]) -> None:
    """Per-head q/k norm weights [heads, head_dim] (Cohere's qk-norm) follow the head counts; norms over
    head_dim alone (Qwen3's) are shared by all heads and stay."""
    for name, n in heads.items():
        norm = getattr(attn, name, None)
        weight = getattr(norm, "weight", None)
        if isinstance(weight, nn.Parameter) and weight.dim() == 2 and weight.shape[0] != n:
            norm.weight = _empty(weight, (n, int(weight.shape[1])))


def _check_head_dim(attn: nn.Module, w: Widths) -> None:
    if slots_of(attn) is None and w["head_dim"] != attn.head_dim:
        raise SparsifyError(f"head_dim {w['head_dim']} differs from the model's {attn.head_dim} (set by "
                            "config.head_dim); head_dim slots prune only after sparsify.hf.explicit_attention_ (whose "
                            "record is config.sparsify_head_dims), so the record is corrupt")


def _attention_resize(attn: nn.Module, w: Widths) -> None:
    if slots_of(attn) is not None:
        _resize_slots(attn, w["num_attention_heads"], w["num_key_value_heads"], w["head_dim"])
        return
    q, kv = w["num_attention_heads"] * w["head_dim"], w["num_key_value_heads"] * w["head_dim"]
    _linear(attn.q_proj, out=q)
    _linear(attn.k_proj, out=kv)
    _linear(attn.v_proj, out=kv)
    _linear(attn.o_proj, inp=q)
    _resize_head_norms(attn, {"q_norm": w["num_attention_heads"], "k_norm": w["num_key_value_heads"]})
    attn.num_key_value_groups = w["num_attention_heads"] // w["num_key_value_heads"]
    for name in ("num_heads", "num_attention_heads"):  # older transformers kept head counts on the module
        if hasattr(attn, name):
            setattr(attn, name, w["num_attention_heads"])
    if hasattr(attn, "num_key_value_heads"):
        attn.num_key_value_heads = w["num_key_value_heads"]


def _llama_resize(layer: nn.Module, w: Widths, config: Any) -> None:
    mlp = layer.mlp
    _check_head_dim(layer.self_attn, w)
    hidden = _resize_mlp(mlp, w["intermediate_size"])
    if hasattr(mlp, "hidden_size"):
        mlp.hidden_size = hidden
    layer.hidden_size = hidden
    _attention_resize(layer.self_attn, w)


_ATTENTION_FIELDS = {"num_attention_heads": "num_attention_heads", "num_key_value_heads": "num_key_value_heads",
                     "head_dim": "head_dim"}
_LLAMA = Family(fields={"intermediate_size": "intermediate_size", **_ATTENTION_FIELDS},
                layers=lambda base: base.layers, read=_llama_read, resize=_llama_resize)


# ----- LLaMA attention with sparse-MoE layers (sparsify.hf.llama_like.MOE_LAYERS) ---------------
def _moe_block(layer: nn.Module, attr: str, block: str) -> nn.Module:
    mlp = getattr(layer, attr, None)
    if type(mlp).__name__ != block:
        raise SparsifyError(f"its {attr} is a {type(mlp).__name__}, not a {block}: a dense layer among the MoE layers "
                            "(mlp_only_layers, decoder_sparse_step) has widths this family does not record. Save "
                            "with sparsify.save(), which replays the pruning plan on the original architecture.")
    return mlp


def _experts(block: nn.Module) -> nn.Module:
    """The fused experts (gate_up_proj [E, 2I, H] with gate|up concatenated, down_proj [E, H, I]); else raises."""
    experts = getattr(block, "experts", None)
    tensors = [getattr(experts, t, None) for t in ("gate_up_proj", "down_proj")]
    layout = (getattr(experts, "is_transposed", True), getattr(experts, "is_concatenated", False),
              getattr(experts, "has_gate", False))
    if any(not isinstance(t, nn.Parameter) or t.dim() != 3 for t in tensors) or layout != (False, True, True):
        raise SparsifyError(f"{type(block).__name__}'s experts are not fused gate|up [E, 2I, H] and down [E, H, I] "
                            "tensors (another transformers version?): their widths cannot be recorded")
    return experts


def _experts_width(block: nn.Module) -> int:
    experts = _experts(block)
    up, down = experts.gate_up_proj, experts.down_proj
    if up.shape[1] % 2:
        raise SparsifyError(f"experts.gate_up_proj has {up.shape[1]} rows, not gate|up of equal widths")
    return _same("expert widths", gate_up_proj=int(up.shape[1]) // 2, down_proj_in=int(down.shape[2]))


def _resize_experts(block: nn.Module, width: int) -> None:
    experts = _experts(block)
    up, down = experts.gate_up_proj, experts.down_proj
    if up.shape[1] != 2 * width:
        experts.gate_up_proj = _empty(up, (int(up.shape[0]), 2 * width, int(up.shape[2])))
    if down.shape[2] != width:
        experts.down_proj = _empty(down, (int(down.shape[0]), int(down.shape[1]), width))
    if hasattr(experts, "intermediate_dim"):
        experts.intermediate_dim = width


def moe_family(block: str, experts_field: str, attr: str = "mlp", shared_expert: bool = False) -> Family:
    """LLaMA attention with a sparse-MoE ``layer.<attr>`` of class ``block`` in every layer: the attention
    widths, the experts' intermediate width (config ``experts_field``; a channel group where the experts run
    as batched matmuls) and, with ``shared_expert``, Qwen2-MoE's shared-expert width are read and resized.
    Expert counts are ``sparsify.hf.experts``'s."""
    def read(layer: nn.Module) -> Widths:
        mlp = _moe_block(layer, attr, block)
        w = {**_attention_read(layer.self_attn), "experts_intermediate_size": _experts_width(mlp)}
        if shared_expert:
            w["shared_expert_intermediate_size"] = _mlp_width(mlp.shared_expert, "shared-expert widths")
        return w

    def resize(layer: nn.Module, w: Widths, config: Any) -> None:
        mlp = _moe_block(layer, attr, block)
        _check_head_dim(layer.self_attn, w)
        _experts(mlp)  # raises before anything changes
        if shared_expert:
            _resize_mlp(mlp.shared_expert, w["shared_expert_intermediate_size"])
        _resize_experts(mlp, w["experts_intermediate_size"])
        _attention_resize(layer.self_attn, w)

    fields: dict[str, str | None] = {**_ATTENTION_FIELDS, "experts_intermediate_size": experts_field}
    if shared_expert:
        fields["shared_expert_intermediate_size"] = "shared_expert_intermediate_size"
    return Family(fields=fields, layers=lambda base: base.layers, read=read, resize=resize)


# ----- GPT-2 -----------------------------------------------------------------------------------
def _gpt2_read(layer: nn.Module) -> Widths:
    mlp, attn = layer.mlp, layer.attn
    inter = _same("MLP widths", c_fc=int(mlp.c_fc.weight.shape[1]), c_proj_in=int(mlp.c_proj.weight.shape[0]))
    slots = slots_of(attn)
    if slots is not None:
        return {"intermediate_size": inter, "num_attention_heads": slots["num_attention_heads"],
                "head_dim": slots["head_dim"]}
    qkv = int(attn.c_attn.weight.shape[1])
    if qkv % 3:
        raise SparsifyError(f"c_attn has {qkv} output channels, not q|k|v of equal widths")
    inner = _same("attention widths", c_attn=qkv // 3, c_proj_in=int(attn.c_proj.weight.shape[0]))
    d = int(attn.head_dim)
    return {"intermediate_size": inter, "num_attention_heads": _heads("c_attn", inner, d), "head_dim": d}


def _gpt2_resize(layer: nn.Module, w: Widths, config: Any) -> None:
    mlp, attn = layer.mlp, layer.attn
    _conv1d(mlp.c_fc, out=w["intermediate_size"])
    _conv1d(mlp.c_proj, inp=w["intermediate_size"])
    if slots_of(attn) is not None:
        _resize_slots(attn, w["num_attention_heads"], w["num_attention_heads"], w["head_dim"])
        return
    inner = w["num_attention_heads"] * w["head_dim"]
    _conv1d(attn.c_attn, out=3 * inner)
    _conv1d(attn.c_proj, inp=inner)
    attn.num_heads, attn.head_dim, attn.split_size = w["num_attention_heads"], w["head_dim"], inner
    if getattr(config, "scale_attn_weights", True):
        attn.scaling = w["head_dim"] ** -0.5


_GPT2 = Family(fields={"intermediate_size": "n_inner", "num_attention_heads": "num_attention_heads",
                       "head_dim": None},
               layers=lambda base: base.h, read=_gpt2_read, resize=_gpt2_resize)


# ----- BERT ------------------------------------------------------------------------------------
def _bert_read(layer: nn.Module) -> Widths:
    sa = layer.attention.self
    inter = _same("MLP widths", intermediate=_rows(layer.intermediate.dense), output_in=_cols(layer.output.dense))
    slots = slots_of(sa)
    if slots is not None:
        return {"intermediate_size": inter, "num_attention_heads": slots["num_attention_heads"],
                "head_dim": slots["head_dim"]}
    inner = _same("attention widths", query=_rows(sa.query), key=_rows(sa.key), value=_rows(sa.value),
                  output_in=_cols(layer.attention.output.dense))
    d = int(sa.attention_head_size)
    return {"intermediate_size": inter, "num_attention_heads": _heads("query", inner, d), "head_dim": d}


def _bert_resize(layer: nn.Module, w: Widths, config: Any) -> None:
    sa = layer.attention.self
    _linear(layer.intermediate.dense, out=w["intermediate_size"])
    _linear(layer.output.dense, inp=w["intermediate_size"])
    if slots_of(sa) is not None:
        _resize_slots(sa, w["num_attention_heads"], w["num_attention_heads"], w["head_dim"],
                      out=layer.attention.output.dense)
        return
    inner = w["num_attention_heads"] * w["head_dim"]
    for m in (sa.query, sa.key, sa.value):
        _linear(m, out=inner)
    _linear(layer.attention.output.dense, inp=inner)
    sa.num_attention_heads, sa.attention_head_size, sa.all_head_size = w["num_attention_heads"], w["head_dim"], inner
    sa.scaling = w["head_dim"] ** -0.5


_BERT = Family(fields={"intermediate_size": "intermediate_size", "num_attention_heads": "num_attention_heads",
                       "head_dim": None},
               layers=lambda base: base.encoder.layer, read=_bert_read, resize=_bert_resize)

for _type in llama_like.DENSE_LAYERS:
    register_family(_type, _LLAMA)
for _type, (_attr, _block, _field) in llama_like.MOE_LAYERS.items():
    register_family(_type, moe_family(_block, _field, attr=_attr, shared_expert=_type == "qwen2_moe"))
register_family("gpt2", _GPT2)
register_family("bert", _BERT)


# ----- lookup ------------------------------------------------------------------------------------
def family_of(config: Any) -> Family:
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise SparsifyError(f"sparsify.hf does not know the layout of model_type {model_type!r} (known: "
                            f"{FAMILIES.list()}); describe it with sparsify.hf.register_family(model_type, "
                            "Family(...))")
    return FAMILIES.get(model_type)


def layers_of(model: nn.Module, family: Family) -> nn.ModuleList:
    base = getattr(model, "base_model", model)
    try:
        return family.layers(base)
    except AttributeError as exc:
        raise SparsifyError(f"{type(model).__name__} does not have the layer list of model_type "
                            f"{model.config.model_type!r}: {exc}") from exc

