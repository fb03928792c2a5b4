"""Checks shared by the LLM-facing functions, run before anything changes or any batch reaches the model.

``check_model`` refuses a model that one of ``sparsify.hf``'s in-place functions would change wrongly: a
``torch.compile`` or peft wrapper (the function must see the plain model), one that still carries a
Sparsifier's masks (its graph would point at removed modules), or one without a Hugging Face config.
``token_batches`` checks calibration/training batches of token ids: a list of tensors or dicts with
``input_ids`` of shape (batch, tokens), integers inside the vocabulary, an ``attention_mask`` of the same
shape, and no KV cache (a cache object fills up across the batches, so later batches attend to earlier ones).
Each error names what is wrong and the fix; the model and the batches are only read.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from sparsify.errors import SparsifyError

_CACHE_KEYS = ("past_key_values", "past_key_value", "cache")


def check_model(model: Any, what: str, *, masks: bool = True) -> None:
    """Refuse a wrapped model, one with live Sparsifier masks (if ``masks``), or one without ``.config``."""
    if not isinstance(model, nn.Module):
        raise SparsifyError(f"{what} expects a Hugging Face model (an nn.Module), got {type(model).__name__}")
    if hasattr(model, "_orig_mod") and type(model).__name__ == "OptimizedModule":
        raise SparsifyError(f"{what} got a torch.compile wrapper: pass the plain model (model._orig_mod) and "
                            "compile it again afterwards")
    if any(c.__module__.split(".")[0] == "peft" for c in type(model).__mro__):
        raise SparsifyError(f"{what} got a peft model ({type(model).__name__}): fold the adapters in first with "
                            "model = model.merge_and_unload()")
    masked = [name for name, m in model.named_modules() if parametrize.is_parametrized(m)] if masks else []
    if masked:
        raise SparsifyError(f"{what}: {len(masked)} modules still carry a Sparsifier's masks/parametrizations "
                            f"(e.g. '{masked[0]}'); call Sparsifier.prune() first")
    if getattr(model, "config", None) is None:
        raise SparsifyError(f"{what} needs a Hugging Face model with a .config, got {type(model).__name__}")


def vocab_size(model: nn.Module) -> int | None:
    """Rows of the input embedding (the ids it accepts), else ``config.vocab_size``, else None."""
    get = getattr(model, "get_input_embeddings", None)
    embedding = get() if callable(get) else None
    weight = getattr(embedding, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 2:
        return int(weight.shape[0])
    size = getattr(getattr(model, "config", None), "vocab_size", None)
    return size if isinstance(size, int) else None


def check_ids(ids: Any, vocab: int | None, what: str, *, dims: int = 2, values: bool = True) -> None:
    """``ids``: an integer tensor of ``dims`` dims, none empty, with values in ``0..vocab-1`` (if ``values``)."""
    shape = "(batch, tokens)" if dims == 2 else "(tokens,)"
    if not isinstance(ids, torch.Tensor):
        raise SparsifyError(f"{what}: input_ids must be a tensor of token ids {shape}, got {type(ids).__name__}")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise SparsifyError(f"{what}: input_ids must hold integer token ids, got {ids.dtype}; tokenize the text "
                            "(or .long() ids that were stored as floats)")
    if ids.dim() != dims:
        raise SparsifyError(f"{what}: input_ids must have shape {shape}, got {tuple(ids.shape)}"
                            + ("; add the batch dimension with ids.unsqueeze(0)" if ids.dim() == 1 else ""))
    if ids.numel() == 0:
        raise SparsifyError(f"{what}: input_ids of shape {tuple(ids.shape)} hold no token; drop empty batches")
    if values and vocab is not None:
        wide = ids if ids.dtype in (torch.int64, torch.int32) else ids.long()  # min/max skip uint16/32/64
        low, high = int(wide.min()), int(wide.max())
        if low < 0 or high >= vocab:
            raise SparsifyError(f"{what}: token ids must be in 0..{vocab - 1} (the model's vocabulary), got "
                                f"{low}..{high}; use the model's own tokenizer")


def check_batch(batch: Any, vocab: int | None, what: str, *, values: bool = True) -> dict[str, Any]:
    """One batch as a dict of model inputs (a bare tensor is its ``input_ids``), checked."""
    inputs = {"input_ids": batch} if isinstance(batch, torch.Tensor) else batch
    if not isinstance(inputs, Mapping) or "input_ids" not in inputs:
        raise SparsifyError(f"{what}: a batch must be a tensor of token ids or a dict with 'input_ids', "
                            f"got {type(batch).__name__}")
    cached = [k for k in _CACHE_KEYS if inputs.get(k) is not None] + (["use_cache"] if inputs.get("use_cache") else [])
    if cached:
        raise SparsifyError(f"{what}: a batch carries {cached}: a KV cache fills up across batches (later ones "
                            "would attend to earlier ones); drop those keys")
    ids = inputs["input_ids"]
    check_ids(ids, vocab, what, values=values)
    mask = inputs.get("attention_mask")
    if mask is not None and (not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(ids.shape)):
        got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise SparsifyError(f"{what}: attention_mask must have the shape of input_ids {tuple(ids.shape)}, got {got}")
    return dict(inputs)


def token_batches(model: nn.Module, batches: Iterable[Any], what: str) -> list[dict[str, Any]]:
    """Every batch of ``batches`` checked (see the module docstring), as dicts of model inputs."""
    if isinstance(batches, (torch.Tensor, Mapping, str, bytes)) or not isinstance(batches, Iterable):
        raise SparsifyError(f"{what}: batches must be a list of batches (tensors of token ids or dicts of model "
                            f"inputs), got one {type(batches).__name__}; wrap a single batch as [batch]")
    vocab = vocab_size(model)
    out = [check_batch(b, vocab, what) for b in batches]
    if not out:
        raise SparsifyError(f"{what} got no calibration batches; pass a list with at least one batch of token ids")
    return out
