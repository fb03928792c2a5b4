"""Generated model lists and builders for the coverage zoo (``benchmarks.coverage``); the timm and
torchvision builders are in ``benchmarks.coverage_vision``.

* Hugging Face: every ``model_type`` of ``transformers.CONFIG_MAPPING``; its default config shrunk by a
  table of generic overrides applied only to the fields the config has (sub-configs too); the task head
  is the first of causal LM, masked LM, seq2seq LM, image / audio classification, AutoModel that knows the
  config; text, image and audio inputs are made where simple.

Every builder returns ``(model in float64 eval mode, example inputs, modules Torch-Pruning must ignore)``.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from benchmarks import coverage_inputs
from benchmarks.coverage_inputs import IMAGE

Built = tuple[nn.Module, Any, list[nn.Module]]
__all__ = ["IMAGE", "Built", "NotBuilt", "build_hf", "hf_config", "hf_families", "hf_model_class", "hf_sub_config_of"]


class NotBuilt(Exception):
    """The model (or its inputs) could not be made: it is left out of the denominators."""


# ---------------------------------------------------------------------------------------------- HF
_LAYERS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "encoder_layers", "decoder_layers",
           "num_encoder_layers", "num_decoder_layers", "depth")
_WIDTH = ("hidden_size", "d_model", "n_embd", "embed_dim", "dim", "word_embed_proj_dim", "projection_dim")
_HEADS = ("num_attention_heads", "n_head", "n_heads", "encoder_attention_heads", "decoder_attention_heads",
          "num_heads")
_KV_HEADS = ("num_key_value_heads", "num_kv_heads", "multi_query_group_num")
_FFN = ("intermediate_size", "ffn_dim", "encoder_ffn_dim", "decoder_ffn_dim", "n_inner", "d_ff", "d_inner",
        "ffn_hidden_size", "moe_intermediate_size", "shared_expert_intermediate_size")
#: generic size overrides: field → value, applied only where the config has an int there
OVERRIDES: dict[str, int] = {
    **dict.fromkeys(_LAYERS, 2), **dict.fromkeys(_WIDTH, 64), **dict.fromkeys(_HEADS, 4),
    **dict.fromkeys(_KV_HEADS, 2), **dict.fromkeys(_FFN, 128), "head_dim": 16, "vocab_size": 128,
    "image_size": 32, "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "num_experts_per_tok": 2,
    "max_position_embeddings": 128, "max_source_positions": 64, "max_target_positions": 64,
    # multi-head latent attention (DeepSeek V2/V3 and its descendants): head_dim is qk_rope_head_dim there
    "qk_rope_head_dim": 16, "qk_nope_head_dim": 16, "v_head_dim": 16, "kv_lora_rank": 32, "q_lora_rank": 32,
    # grouped expert routing picks topk_group of n_group groups of the (now 4) routed experts
    "n_group": 1, "topk_group": 1,
    # Gemma 3n's per-layer input embeddings (a 262144-token table per layer) and its KV-sharing layers
    "vocab_size_per_layer_input": 128, "hidden_size_per_layer_input": 16, "num_kv_shared_layers": 0,
}
_TOKEN_IDS = ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id", "sep_token_id",
              "cls_token_id", "mask_token_id", "unk_token_id")
_HEADS_IN_ORDER = ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "MODEL_FOR_MASKED_LM_MAPPING_NAMES",
                   "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES",
                   "MODEL_FOR_AUDIO_CLASSIFICATION_MAPPING_NAMES", "MODEL_MAPPING_NAMES")


_BACKBONE_OUTPUTS = ("out_features", "out_indices")


def _per_layer(key: str) -> bool:
    return key.endswith("layer_types") or key == "per_layer_config"


def _split_evenly(total: int, parts: int) -> list[int]:
    """``total`` as ``parts`` ints that differ by at most one (an mrope_section that sums to head_dim / 2)."""
    return [total // parts + (i < total % parts) for i in range(parts)]


def hf_families() -> list[str]:
    from transformers import CONFIG_MAPPING

    return sorted(CONFIG_MAPPING.keys())


def _shrink(d: dict[str, Any], layers: bool = True, every_layer_type: bool = False) -> dict[str, Any]:
    """The generic overrides applied to a config dict (and every sub-config dict in it); with
    ``layers=False`` the layer counts are kept (for configs that tie per-layer patterns to them). With
    ``every_layer_type`` the per-layer lists keep one layer of each type (hybrids whose first two layers are
    linear attention need a full-attention one) and per-layer feed-forward sizes get one entry per layer."""
    out = dict(d)
    mixed = _one_layer_per_type(d) if layers and every_layer_type else {}
    for key, value in d.items():
        if key in mixed:
            out[key] = mixed[key]
        elif key == "per_layer_config" and isinstance(value, dict):  # keys are layer indices
            out[key] = value if not layers else {k: v for k, v in value.items() if str(k).isdigit() and int(k) < 2}
        elif isinstance(value, dict) and ("model_type" in value or key.endswith("_config")):
            out[key] = _shrink(value, layers, every_layer_type)
        elif not layers and (key in _LAYERS or _per_layer(key)):
            continue
        elif key in OVERRIDES and isinstance(value, int) and not isinstance(value, bool):
            out[key] = min(value, OVERRIDES[key]) if key.startswith("max_") else OVERRIDES[key]
        elif key.endswith("layer_types") and isinstance(value, list):  # layer_types, mlp_layer_types, ...
            out[key] = value[:2]
        elif key in _BACKBONE_OUTPUTS:  # stage names of the full depth: the backbone's default (its last stage)
            out[key] = None
    if "kv_lora_rank" in out and isinstance(out.get("num_key_value_heads"), int):  # latent attention: no KV groups
        out["num_key_value_heads"] = out.get("num_attention_heads", out["num_key_value_heads"])
    rope = out.get("rope_parameters")
    if isinstance(rope, dict) and isinstance(rope.get("mrope_section"), list) and isinstance(out.get("head_dim"), int):
        out["rope_parameters"] = {**rope, "mrope_section": _split_evenly(out["head_dim"] // 2,
                                                                          len(rope["mrope_section"]))}
    vocab = out.get("vocab_size")
    if isinstance(vocab, int):
        for i, key in enumerate(_TOKEN_IDS):
            if isinstance(out.get(key), int) and out[key] >= vocab:
                out[key] = i
    text = out.get("text_config")
    vocab = vocab if isinstance(vocab, int) else text.get("vocab_size") if isinstance(text, dict) else None
    if isinstance(vocab, int):  # image / video / audio placeholders: the last ids of the shrunk vocabulary
        placeholders = [k for k, v in out.items() if k.endswith(("_token_id", "_token_index")) and k not in _TOKEN_IDS
                        and isinstance(v, int) and not isinstance(v, bool) and v >= vocab]
        for i, key in enumerate(sorted(placeholders)):
            out[key] = vocab - 1 - i
    return out


def _one_layer_per_type(d: dict[str, Any]) -> dict[str, Any]:
    """Per-layer type lists as one layer of each type, in order of first appearance (the first two layers
    when they already differ or there is one type), the layer counts set to match, per-layer lists of
    feed-forward sizes (Gemma 3n's ``intermediate_size``) given that many entries of the override, other
    lists of one value per layer cut to that many."""
    kinds = {k: v for k, v in d.items() if _per_layer(k) and isinstance(v, list) and v}
    firsts = {k: [v[i] for i in sorted({v.index(t) for t in v})] for k, v in kinds.items()}  # each type once
    lists = {k: (v if len(v) >= 2 else kinds[k][:2]) for k, v in firsts.items()}
    n = max([2, *map(len, lists.values())])
    out: dict[str, Any] = {k: (v * n)[:n] for k, v in lists.items()}
    out.update({k: n for k, v in d.items() if k in _LAYERS and isinstance(v, int) and not isinstance(v, bool)})
    out.update({k: [OVERRIDES[k]] * n for k, v in d.items() if k in _FFN and isinstance(v, list)})
    depth = max((v for k, v in d.items() if k in _LAYERS and isinstance(v, int)), default=None)
    out.update({k: v[:n] for k, v in d.items()  # other per-layer values (Gemma 3n's activation sparsity)
                if k not in out and isinstance(v, list) and depth and len(v) == depth > n})
    return out


def hf_config(model_type: str, use_cache: bool | None = None, layers: bool = True,
              every_layer_type: bool = False) -> Any:
    from transformers import AutoConfig

    default = AutoConfig.for_model(model_type)
    d = _shrink(default.to_dict(), layers, every_layer_type)
    if use_cache is not None:
        _set_use_cache(d, use_cache)
    config = type(default).from_dict(d)
    # MoE experts: grouped_mm takes float32/bf16/fp16 only and the eager loop over the experts that got
    # tokens is data-dependent (torch.export refuses it); batched_mm runs in float64 and exports
    config._experts_implementation = "batched_mm"
    return config


def _set_use_cache(d: dict[str, Any], use_cache: bool) -> None:
    """``use_cache`` wherever the config (or a sub-config: the text model of a multimodal one) has it."""
    if "use_cache" in d:
        d["use_cache"] = use_cache
    for value in d.values():
        if isinstance(value, dict):
            _set_use_cache(value, use_cache)


def hf_model_class(config: Any) -> tuple[str, type]:
    """(task, class) of the first task head that knows the config's model type."""
    import transformers
    from transformers.models.auto import modeling_auto

    for mapping in _HEADS_IN_ORDER:
        names = getattr(modeling_auto, mapping, {}).get(config.model_type)
        if names:
            name = names[0] if isinstance(names, (list, tuple)) else names
            if hasattr(transformers, name):
                return mapping.removeprefix("MODEL_FOR_").removesuffix("_MAPPING_NAMES").lower() or "model", getattr(
                    transformers, name)
    own = _own_model_class(config)  # a part of a multimodal family (aimv2_text_model): its own *Model class
    if own is not None:
        return "model", own
    raise NotBuilt(f"no AutoModel class for model_type {config.model_type!r}")


def _own_model_class(config: Any) -> type | None:
    """The model class of the config's own modeling module whose ``config_class`` is the config's type,
    a ``*Model`` first (sub-model types have no AutoModel mapping but such a class)."""
    import importlib
    import inspect

    from transformers import PreTrainedModel

    try:
        module = importlib.import_module(type(config).__module__.replace(".configuration_", ".modeling_"))
    except ImportError:
        return None
    found = [cls for name, cls in inspect.getmembers(module, inspect.isclass)
             if issubclass(cls, PreTrainedModel) and getattr(cls, "config_class", None) is type(config)
             and not name.endswith("PreTrainedModel") and cls.__module__ == module.__name__]
    return min(found, key=lambda c: (not c.__name__.endswith("Model"), len(c.__name__)), default=None)


def hf_task_of(model_type: str) -> str | None:
    """The first task head (as in ``hf_model_class``) that names ``model_type``, without building a config."""
    from transformers.models.auto import modeling_auto

    for mapping in _HEADS_IN_ORDER:
        if getattr(modeling_auto, mapping, {}).get(model_type):
            return mapping.removeprefix("MODEL_FOR_").removesuffix("_MAPPING_NAMES").lower() or "model"
    return None


@functools.cache
def _sub_config_parents() -> dict[str, str]:
    """model type → the first model type (alphabetically) whose config class lists its config in ``sub_configs``."""
    from transformers import CONFIG_MAPPING

    parents: dict[str, str] = {}
    for parent in sorted(CONFIG_MAPPING.keys()):
        try:
            subs = getattr(CONFIG_MAPPING[parent], "sub_configs", None) or {}
        except Exception:  # a config module that does not import here
            continue
        for sub in subs.values():
            child = getattr(sub, "model_type", None)
            if isinstance(child, str) and child and child != parent:
                parents.setdefault(child, parent)
    return parents


def _has_any_head(model_type: str) -> bool:
    """Whether any task mapping of transformers' auto classes (AutoModel, backbones, segmentation, …) names it."""
    from transformers.models.auto import modeling_auto

    return any(model_type in names for key, names in vars(modeling_auto).items()
               if key.startswith("MODEL_") and key.endswith("_MAPPING_NAMES") and isinstance(names, dict))


def hf_sub_config_of(model_type: str) -> str | None:
    """The family a sub-config belongs to, else None. A sub-config is a model type that no auto class of any
    task knows and whose config class is a ``sub_configs`` entry of another model type's config (CLAP's
    ``clap_text_model``); the parent is climbed to a model type that has a task head or no parent itself.
    Such a type is checked as a part of its parent and is not a family of its own."""
    parents = _sub_config_parents()
    if model_type not in parents or _has_any_head(model_type):
        return None
    seen, parent = {model_type}, parents[model_type]
    while not _has_any_head(parent) and parent in parents and parents[parent] not in seen:
        seen.add(parent)
        parent = parents[parent]
    return parent


def is_decoder(task: str, config: Any) -> bool:
    return task in ("causal_lm", "seq_to_seq_causal_lm") or bool(getattr(config, "is_encoder_decoder", False))


def build_hf(model_type: str, use_cache: bool | None = None) -> tuple[str, Built]:
    """The tiny model: 2 layers if its config allows, else one layer of each layer type, else its own layer
    count with the other overrides."""
    try:
        return _build_hf(model_type, use_cache, layers=True)
    except NotBuilt as first:
        for layers, every_layer_type in ((True, True), (False, False)):
            try:
                return _build_hf(model_type, use_cache, layers, every_layer_type)
            except NotBuilt:
                pass
        raise first from None


def _build_hf(model_type: str, use_cache: bool | None, layers: bool,
              every_layer_type: bool = False) -> tuple[str, Built]:
    try:
        config = hf_config(model_type, use_cache, layers, every_layer_type)
        _, cls = hf_model_class(config)
        torch.manual_seed(0)
        model = cls(config).double().eval()
        inputs = _inputs_that_run(model, config)
    except NotBuilt:
        raise
    except Exception as exc:
        raise NotBuilt(f"tiny {model_type} does not build or run: {type(exc).__name__}: {_first_line(exc)}") from exc
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return f"{cls.__name__}", (model, inputs, [head] if isinstance(head, nn.Module) else [])


def _inputs_that_run(model: nn.Module, config: Any) -> dict[str, torch.Tensor]:
    """The first of ``coverage_inputs.input_candidates`` the model runs on (placeholder tokens added as
    many as it asks for); the first candidate's error when none runs."""
    first: Exception | None = None
    try:
        candidates = list(coverage_inputs.input_candidates(model, config))
    except coverage_inputs.NoInputs as exc:
        raise NotBuilt(str(exc)) from None
    for inputs in candidates:
        for _ in range(3):  # image, then video / audio placeholders
            try:
                with torch.no_grad():
                    model(**inputs)
                return inputs
            except Exception as exc:
                first = first or exc
                inputs = coverage_inputs.with_placeholders(inputs, config, exc)
                if inputs is None:
                    break
    assert first is not None
    raise first


def _first_line(exc: BaseException) -> str:
    """The error's first line; with the next one when the first only introduces it (a config validator's)."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    text = " ".join(lines[:2]) if len(lines) > 1 and lines[0].endswith(":") else (lines[0] if lines else "")
    return (text or type(exc).__name__)[:200]
