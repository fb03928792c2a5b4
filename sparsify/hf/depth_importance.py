"""Importance of decoder layers and of their attention / MLP sub-blocks, measured on calibration batches.

``layer_importance(model, batches, method)`` returns one number per decoder layer (high: keep; remove
the lowest with ``sparsify.hf.remove_layers`` / ``remove_sublayers``):

- ``block_influence`` (ShortGPT, Men et al. 2024): 1 − mean over tokens of cos(h_in, h_out), the
  layer's input and output residual streams; ``attn_block_influence`` and ``mlp_block_influence`` the
  same across the attention sub-block (h_in → h_in + attn) and the MLP sub-block (→ h_out).
- ``ppl_drop``: the perplexity increase when the layer is skipped (the next-token perplexity of the
  batches without it, minus that of the whole model).

Depth structures are not channel groups, so this is a plain function rather than an adapter.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sparsify._utils import evaluating
from sparsify.errors import SparsifyError
from sparsify.hf import sublayers
from sparsify.hf.inputs import token_batches

METHODS = ("block_influence", "attn_block_influence", "mlp_block_influence", "ppl_drop")


def _first(value: Any) -> torch.Tensor:
    return value[0] if isinstance(value, (tuple, list)) else value


def _hidden_in(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _token_mask(inputs: dict[str, Any]) -> torch.Tensor:
    mask = inputs.get("attention_mask")
    ids = inputs["input_ids"]
    return torch.ones(ids.shape, dtype=torch.bool, device=ids.device) if mask is None else mask.bool()


@contextlib.contextmanager
def _hooks(handles: list[Any]) -> Iterator[None]:
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _run(model: nn.Module, batches: list[dict[str, Any]], each: Callable[[dict[str, Any]], None]) -> None:
    for inputs in batches:
        each(inputs)
        model(**inputs, use_cache=False)


def _influence(model: nn.Module, batches: list[dict[str, Any]], method: str) -> torch.Tensor:
    layout = sublayers.layout_of(model.config)
    layers = sublayers.decoder_layers(model)
    n = len(layers)
    sums, count = torch.zeros(n, dtype=torch.float64), torch.zeros((), dtype=torch.float64)
    seen: dict[int, dict[str, torch.Tensor]] = {i: {} for i in range(n)}
    mask: dict[str, torch.Tensor] = {}

    def add(i: int, a: torch.Tensor, b: torch.Tensor) -> None:
        cos = F.cosine_similarity(a.double(), b.double(), dim=-1)  # (batch, tokens)
        sums[i] += cos[mask["tokens"]].sum().cpu()

    def pre(i: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            seen[i]["in"] = _hidden_in(args, kwargs)
        return hook

    def attn(i: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            seen[i]["mid"] = seen[i]["in"] + _first(output)
        return hook

    def post(i: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            h_in, h_out = seen[i].pop("in"), _first(output)
            mid = seen[i].pop("mid", None)
            a, b = {"block_influence": (h_in, h_out), "attn_block_influence": (h_in, mid),
                    "mlp_block_influence": (mid, h_out)}[method]
            add(i, a, b)
        return hook

    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(pre(i), with_kwargs=True))
        handles.append(getattr(layer, layout.attention).register_forward_hook(attn(i)))
        handles.append(layer.register_forward_hook(post(i)))

    def each(inputs: dict[str, Any]) -> None:
        nonlocal count
        mask["tokens"] = _token_mask(inputs)
        count += mask["tokens"].sum().cpu()

    with _hooks(handles):
        _run(model, batches, each)
    return 1.0 - sums / count


def _perplexity(model: nn.Module, batches: list[dict[str, Any]]) -> float:
    nll, tokens = 0.0, 0
    for inputs in batches:
        output = model(**inputs, use_cache=False)
        logits = output.logits if hasattr(output, "logits") else _first(output)
        labels = inputs["input_ids"][:, 1:].masked_fill(~_token_mask(inputs)[:, 1:], -100)
        nll += float(F.cross_entropy(logits[:, :-1].double().flatten(0, 1), labels.flatten(), ignore_index=-100,
                                     reduction="sum"))
        tokens += int((labels != -100).sum())
    if tokens == 0:
        raise SparsifyError("ppl_drop needs batches with at least two tokens per sequence (it predicts the next token)")
    return math.exp(nll / tokens)


def _ppl_drop(model: nn.Module, batches: list[dict[str, Any]]) -> torch.Tensor:
    layers = sublayers.decoder_layers(model)
    base = _perplexity(model, batches)
    out = torch.zeros(len(layers), dtype=torch.float64)
    for i, layer in enumerate(layers):
        def skip(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
            h_in = _hidden_in(args, kwargs)
            return (h_in, *output[1:]) if isinstance(output, tuple) else h_in

        with _hooks([layer.register_forward_hook(skip, with_kwargs=True)]):
            out[i] = _perplexity(model, batches) - base
    return out


def layer_importance(model: nn.Module, batches: Iterable[Any], method: str = "block_influence") -> torch.Tensor:
    """One importance per decoder layer (float64, on the CPU), measured on ``batches`` (token-id tensors or
    dicts of model inputs with ``input_ids`` and optionally ``attention_mask``; padded tokens are ignored).

    ``method``: ``block_influence`` (whole layers), ``attn_block_influence`` / ``mlp_block_influence``
    (sub-blocks; a removed sub-block scores 0), or ``ppl_drop`` (perplexity increase without the layer).
    The model runs in eval mode without gradients; its mode is restored afterwards.
    """
    if method not in METHODS:
        raise SparsifyError(f"unknown depth importance method {method!r}; choose one of {list(METHODS)}")
    sublayers.decoder_layers(model)  # refuses unknown families
    inputs = [{k: v for k, v in b.items() if k != "labels"} for b in token_batches(model, batches, "layer_importance")]
    with evaluating(model):
        return _ppl_drop(model, inputs) if method == "ppl_drop" else _influence(model, inputs, method)
