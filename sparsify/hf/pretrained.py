"""Hugging Face models after pruning: a config that agrees with the weights, and save/load.

After ``prune_channels`` or ``Sparsifier.prune()`` the layers of a Hugging Face model are smaller, but
``model.config`` still describes the original architecture. ``sync_config`` reads every layer's widths
from its weights and writes them into the config: widths that are the same in every layer go into the
standard fields (``intermediate_size``, ``hidden_size``, ``num_attention_heads``, ``num_key_value_heads``,
``head_dim``), so a plain ``AutoModelForCausalLM.from_pretrained`` rebuilds the model. Where widths differ
from layer to layer (or the config class cannot express them), every layer's widths are also stored in
``config.sparsify_layer_widths``; ``from_pretrained`` here builds the model from the config, resizes
those layers and loads the weights strictly. Model families are keyed by ``config.model_type``
(``register_family``); gpt2, bert and the LLaMA-like families (``sparsify.hf.llama_like``) are built in.
Models whose attention was swapped by ``explicit_attention_`` (prunable head_dim slots,
``sparsify.hf.attention``; llama, gpt2, bert) also store every layer's attention in
``config.sparsify_head_dims``; ``from_pretrained`` swaps and resizes the attention of the model it builds
before loading.
"""

from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from sparsify.errors import SparsifyError
from sparsify.hf import llama_like, sublayers
from sparsify.hf.families import Widths, attention_of, family_of, layers_of, slots_of
from sparsify.hf.inputs import check_model
from sparsify.io import LoadError

RECORD = "sparsify_layer_widths"
HEAD_DIMS = "sparsify_head_dims"  # per-layer attention of models with explicit_attention_ (head_dim slots)


# ----- head_dim slots (sparsify.hf.attention) ---------------------------------------------------
def head_dims(model: nn.Module) -> list[dict[str, Any]] | None:
    """Every layer's swapped attention (heads, head_dim of q/k, v_head_dim, scale), or None if the model's
    attention is not swapped (``explicit_attention_``)."""
    found = [slots_of(attention_of(layer)[0]) for layer in layers_of(model, family_of(model.config))]
    if all(f is None for f in found):
        return None
    if any(f is None for f in found):
        raise SparsifyError("some layers' attention is swapped by explicit_attention_ and some not; call "
                            "sparsify.hf.explicit_attention_(model) on the whole model")
    return found  # type: ignore[return-value]


def _swap_from_record(model: nn.Module, record: dict[int, dict[str, Any]]) -> None:
    from sparsify.hf import attention as hf_attention

    hf_attention.explicit_attention_(model)
    for i, layer in enumerate(layers_of(model, family_of(model.config))):
        attn, out = attention_of(layer)
        r = record[i]
        hf_attention.resize(attn, r["num_attention_heads"], r["num_key_value_heads"], r["head_dim"], r["v_head_dim"],
                            r["scaling"], rope_scaling=r.get("rope_scaling"), out=out)


def explicit_attention_(model: nn.Module) -> nn.Module:
    """Make the head_dim slots of every attention layer prunable (``sparsify.hf.attention``); in place."""
    from sparsify.hf.attention import explicit_attention_ as swap

    return swap(model)


# ----- sync ------------------------------------------------------------------------------------
def _hidden(model: nn.Module) -> int:
    return int(model.get_input_embeddings().weight.shape[1])


def layer_widths(model: nn.Module) -> list[Widths]:
    """Every layer's widths (intermediate_size, num_attention_heads, ...), read from its weights."""
    with sublayers.full_sublayers(model):  # a removed sub-block reads as the original (sparsify.hf.sublayers)
        return _layer_widths(model)


def _layer_widths(model: nn.Module) -> list[Widths]:
    family = family_of(model.config)
    out = []
    for i, layer in enumerate(layers_of(model, family)):
        try:
            out.append(family.read(layer))
        except SparsifyError as exc:
            raise SparsifyError(f"layer {i} of {type(model).__name__}: {exc}") from None
    return out


def _skeleton(cls: type, config: Any) -> nn.Module:
    """The model ``config`` builds, on the meta device (shapes only, no memory, no arithmetic); raises
    where the config class rejects the config (``validate()``, run by save_pretrained and loading)."""
    if callable(getattr(config, "validate", None)):
        config.validate()
    with torch.device("meta"):
        return cls(config)


def _apply_fields(config: Any, fields: dict[str, int]) -> None:
    for attr, value in fields.items():
        setattr(config, attr, value)


def sync_config(model: nn.Module) -> Any:
    """Make ``model.config`` (and the layers' module attributes) agree with the weights; returns the config.

    Widths uniform over the layers go into the config's fields (the largest one where they differ);
    if some layer then still differs from what the config builds, every layer's widths are stored in
    ``config.sparsify_layer_widths`` (load with ``sparsify.hf.from_pretrained``), else that entry is
    removed (plain ``from_pretrained`` works). Raises ``SparsifyError`` if the weights fit no config
    of the model's class; the model and config are then unchanged.
    """
    check_model(model, "sync_config", masks=False)
    with sublayers.full_sublayers(model):
        return _sync_config(model)


def _sync_config(model: nn.Module) -> Any:
    config = model.config
    family = family_of(config)
    widths = layer_widths(model)
    fields: dict[str, int] = {"hidden_size": _hidden(model)}
    for name, attr in family.fields.items():
        if attr is not None:
            fields[attr] = max(w[name] for w in widths)
    candidate = copy.deepcopy(config)
    _apply_fields(candidate, fields)
    for key in (RECORD, HEAD_DIMS):
        if hasattr(candidate, key):
            delattr(candidate, key)
    try:
        skeleton = _skeleton(type(model), candidate)
    except Exception:  # head counts the config class rejects (e.g. hidden_size % num_attention_heads)
        for name in ("num_attention_heads", "num_key_value_heads", "head_dim"):
            attr = family.fields.get(name)
            if attr is not None:
                fields[attr] = getattr(config, attr)
        _apply_fields(candidate, fields)
        try:
            skeleton = _skeleton(type(model), candidate)
        except Exception as exc:
            cause = " ".join(str(exc).split())[:300].rstrip(".")
            raise SparsifyError(
                f"no {type(config).__name__} describes the pruned widths (hidden_size={fields['hidden_size']}): "
                f"{type(exc).__name__}: {cause}. Prune the hidden width to a size the config "
                "class accepts (e.g. a multiple of num_attention_heads), or save with sparsify.save(), which "
                "replays the pruning plan on the original architecture.") from exc
    built = layer_widths(skeleton)
    slots = head_dims(model)
    # module attributes first: if a layer cannot take its widths, nothing has been changed yet
    for layer, w in zip(layers_of(model, family), widths, strict=True):
        family.resize(layer, w, candidate)
    _apply_fields(config, fields)
    if built != widths:
        setattr(config, RECORD, {str(i): dict(w) for i, w in enumerate(widths)})
    elif hasattr(config, RECORD):
        delattr(config, RECORD)
    if slots is not None:
        setattr(config, HEAD_DIMS, {str(i): s for i, s in enumerate(slots)})
    elif hasattr(config, HEAD_DIMS):
        delattr(config, HEAD_DIMS)
    return config


# ----- save / load -----------------------------------------------------------------------------
def save_pretrained(model: nn.Module, path: str | Path, **kwargs: Any) -> Path:
    """``sync_config(model)`` then ``model.save_pretrained(path, **kwargs)`` (safetensors); returns the path.

    A model still carrying a policy's parametrizations (STR thresholds, masks) is refused: call
    ``Sparsifier.prune()`` first, which bakes them into the weights.
    """
    check_model(model, "save_pretrained", masks=False)
    if Path(path).exists() and not Path(path).is_dir():
        raise SparsifyError(f"save_pretrained: {path} is a file; pass a directory (it is created if missing)")
    leftover = sorted(name for name, m in model.named_modules() if parametrize.is_parametrized(m))
    if leftover:
        raise SparsifyError(f"{len(leftover)} modules still carry parametrizations (e.g. '{leftover[0]}'): their "
                            "state dict would hold 'parametrizations.*' keys that no model loads. Call "
                            "Sparsifier.prune() first (it bakes the learned thresholds/masks into the weights).")
    sync_config(model)
    directory = Path(path)
    model.save_pretrained(directory, **kwargs)
    return directory


def _checkpoint_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return [path / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    raise LoadError(f"{path} has no model.safetensors (or model.safetensors.index.json): save the model with "
                    "sparsify.hf.save_pretrained(model, path)")


def _checkpoint_shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    shapes = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                shapes[key] = tuple(f.get_slice(key).get_shape())
    return shapes


def _record(config: Any) -> dict[int, Widths] | None:
    raw = getattr(config, RECORD, None)
    if raw is None:
        return None
    fields = set(family_of(config).fields)
    n = config.num_hidden_layers
    try:
        record = {int(k): {str(f): int(v) for f, v in w.items()} for k, w in raw.items()}
    except (AttributeError, TypeError, ValueError) as exc:
        raise LoadError(f"config.{RECORD} must map layer index → {{width name: int}}, got {raw!r:.200}") from exc
    bad = [i for i, w in record.items() if not 0 <= i < n or set(w) != fields]
    if bad:
        raise LoadError(f"config.{RECORD} entry for layer {bad[0]} is invalid ({record[bad[0]]}): layers are "
                        f"0..{n - 1}, each with exactly the widths {sorted(fields)}")
    return record


_SLOT_FIELDS = {"num_attention_heads": int, "num_key_value_heads": int, "head_dim": int, "v_head_dim": int,
                "scaling": float}


def _head_dim_record(config: Any) -> dict[int, dict[str, Any]] | None:
    raw = getattr(config, HEAD_DIMS, None)
    if raw is None:
        return None
    n = config.num_hidden_layers
    try:
        record = {int(k): {f: _SLOT_FIELDS.get(f, float)(v) for f, v in w.items()} for k, w in raw.items()}
    except (AttributeError, TypeError, ValueError) as exc:
        raise LoadError(f"config.{HEAD_DIMS} must map layer index → {{width name: number}}, got {raw!r:.200}") from exc
    bad = [i for i in range(n) if i not in record or not set(_SLOT_FIELDS) <= set(record[i])]
    if bad or set(record) - set(range(n)):
        i = bad[0] if bad else max(record)
        raise LoadError(f"config.{HEAD_DIMS} entry for layer {i} is missing or invalid ({record.get(i)}): layers "
                        f"are 0..{n - 1}, each with {sorted(_SLOT_FIELDS)}")
    return record


def _resize_layers(model: nn.Module, record: dict[int, Widths]) -> None:
    family = family_of(model.config)
    layers = layers_of(model, family)
    for i, w in sorted(record.items()):
        family.resize(layers[i], w, model.config)


def _layer_prefixes(model: nn.Module, record: dict[int, Widths]) -> tuple[str, ...]:
    layers = layers_of(model, family_of(model.config))
    name = next(n for n, m in model.named_modules() if m is layers)
    return tuple(f"{name}.{i}." if name else f"{i}." for i in record)


def _check_shapes(skeleton: nn.Module, shapes: dict[str, tuple[int, ...]], record: Any, path: Path) -> None:
    for key, t in skeleton.state_dict().items():
        if key in shapes and tuple(t.shape) != shapes[key]:
            if record is None:
                raise LoadError(
                    f"'{key}' is {shapes[key]} in {path} but {tuple(t.shape)} in the {type(skeleton).__name__} that "
                    f"its config.json describes, and config.json has no '{RECORD}': the model was saved after "
                    "pruning without syncing its config. Load it into the pruned model's architecture, and save "
                    "pruned models with sparsify.hf.save_pretrained(model, path), which records per-layer widths.")
            raise LoadError(
                f"'{key}' is {shapes[key]} in {path} but {tuple(t.shape)} after resizing the layers to "
                f"config.{RECORD}: the weights and the recorded widths disagree (was config.json edited, or "
                "written for other weights?). Save the model again with sparsify.hf.save_pretrained.")


def _load_plain(cls: type, path: Path, kwargs: dict[str, Any]) -> nn.Module:
    """``cls.from_pretrained(path)``, refusing a checkpoint that lacks tensors of the model (another model's
    weights would otherwise leave it randomly initialised); transformers' key conversions apply."""
    if "output_loading_info" in kwargs:
        return cls.from_pretrained(path, **kwargs)
    model, info = cls.from_pretrained(path, output_loading_info=True, **kwargs)
    missing = [k for k in sorted(info.get("missing_keys") or ()) if not _zero_bias(model, k)]
    if missing:
        raise LoadError(f"{path} lacks {len(missing)} tensors of the {cls.__name__} its config.json describes "
                        f"(e.g. {missing[:3]}): the weights belong to another model (or another class), and "
                        "loading would leave them randomly initialised. Save the model with "
                        "sparsify.hf.save_pretrained(model, path), or load it with the class it was saved from.")
    return model


def _zero_bias(model: nn.Module, key: str) -> bool:
    """A missing ``*.bias`` that transformers initialised to zeros: the function of a model without it (the
    sibling biases a config flag such as ``attention_bias`` declares beside ones pruning added)."""
    if not key.endswith(".bias"):
        return False
    try:
        tensor = model.get_parameter(key)
    except AttributeError:
        return False
    return not bool(tensor.detach().count_nonzero())


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' report of the size mismatches that the per-layer resize expects."""
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


def _model_class(config: Any, model_class: type | None) -> type:
    if model_class is not None:
        if not isinstance(model_class, type) or not callable(getattr(model_class, "from_pretrained", None)):
            raise LoadError(f"model_class must be a transformers model class (e.g. transformers.LlamaForCausalLM), "
                            f"got {model_class!r:.80}")
        expected = getattr(getattr(model_class, "config_class", None), "model_type", None)
        if expected and expected != getattr(config, "model_type", None):
            saved = getattr(config, "model_type", None)
            raise LoadError(f"model_class {model_class.__name__} builds model_type {expected!r}, but the checkpoint "
                            f"is a {saved!r} model ({getattr(config, 'architectures', None)}); pass a class of that "
                            "family, or leave model_class out")
        return model_class
    import transformers

    names = getattr(config, "architectures", None) or []
    for name in names:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    raise LoadError(f"config.json names no architecture transformers provides ({names}); pass model_class=, "
                    "e.g. from_pretrained(path, model_class=transformers.LlamaForCausalLM)")


def from_pretrained(path: str | Path, model_class: type | None = None, **kwargs: Any) -> nn.Module:
    """Load a model saved by ``save_pretrained`` (or any Hugging Face directory), per-layer widths included.

    Builds ``model_class`` (default: ``config.architectures[0]``) with ``model_class.from_pretrained(path,
    **kwargs)``; if ``config.sparsify_layer_widths`` is present, resizes those layers to the recorded
    widths and loads their weights from the checkpoint. Every checkpoint tensor must have the shape of
    the model so built, else ``LoadError`` says which tensor differs and why.
    """
    from safetensors import safe_open
    from transformers import AutoConfig

    from sparsify._compat import import_torchvision

    with contextlib.suppress(ModuleNotFoundError):
        import_torchvision()
    path = Path(path)
    if not (path / "config.json").is_file():
        raise LoadError(f"{path} is not a directory with a config.json; pass the directory that "
                        "sparsify.hf.save_pretrained(model, path) wrote")
    config = AutoConfig.from_pretrained(path)
    cls = _model_class(config, model_class)
    record = _record(config)
    moe_widths = record is not None and config.model_type in llama_like.MOE_LAYERS
    if getattr(config, "sparsify_num_experts", None) is not None or moe_widths:
        # per-layer expert counts or MoE widths: resized as the model is built, so that transformers loads every
        # tensor through its own key conversions (Mixtral saves its fused experts as per-expert w1/w2/w3)
        from sparsify.hf.experts import from_pretrained_with_counts

        if getattr(config, HEAD_DIMS, None) is not None:
            raise LoadError(f"config.json has both per-layer MoE widths and {HEAD_DIMS}: loading them with swapped "
                            "attention (explicit_attention_) is not supported; save with sparsify.save(), which "
                            "replays the pruning plan on the original architecture.")
        layers = None if record is None else (lambda model: _resize_layers(model, record))
        return from_pretrained_with_counts(path, cls, resize=layers, **kwargs)
    slots = _head_dim_record(config)
    removed = sublayers.read_record(config, LoadError)  # removed attention/MLP sub-blocks (sparsify.hf.depth)
    files = _checkpoint_files(path)
    shapes = _checkpoint_shapes(files)
    skeleton = _skeleton(cls, config)
    if slots is not None:
        _swap_from_record(skeleton, slots)
    if record is not None:
        _resize_layers(skeleton, record)
    _check_shapes(skeleton, shapes, record if slots is None else (record or slots), path)
    if record is None and slots is None:
        if removed is None:
            return _load_plain(cls, path, kwargs)
        with _quiet_transformers():  # the removed sub-blocks' tensors are missing, as expected
            return sublayers.apply_record(cls.from_pretrained(path, **kwargs), shapes, LoadError)
    with _quiet_transformers():
        model = cls.from_pretrained(path, ignore_mismatched_sizes=True, **kwargs)
    if slots is not None:
        _swap_from_record(model, slots)
    if record is not None:
        _resize_layers(model, record)
    prefixes = _layer_prefixes(model, slots if slots is not None else record)
    state = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for file in files:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    if key.startswith(prefixes) and key in state:
                        t = f.get_tensor(key)
                        if isinstance(state[key], nn.Parameter) or state[key].dtype == t.dtype:
                            state[key].copy_(t)
                        else:  # a buffer (a swapped LLaMA attention's inv_freq): keep the saved dtype
                            owner, _, name = key.rpartition(".")
                            setattr(model.get_submodule(owner), name, t.to(state[key].device))
    if record is not None and layer_widths(model) != [record.get(i, w) for i, w in enumerate(layer_widths(model))]:
        raise LoadError(f"the loaded layers do not have the widths config.{RECORD} records")
    return model if removed is None else sublayers.apply_record(model, shapes, LoadError)
