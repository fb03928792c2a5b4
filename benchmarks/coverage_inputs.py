"""Example inputs for the Hugging Face part of the coverage zoo (``benchmarks.coverage_models``).

``input_candidates`` lists, in order, the inputs a tiny model may take: for a vision-language model (a
vision config and an image placeholder token) token ids with pixels first; its main input (token ids, pixels at
the config's image size, raw audio, mel features with the config's bins in either layout), then text and
pixels together (CLIP-, BLIP-2-, LLaVA-like); decoder ids for an encoder-decoder and boxes for layout models
are added where the forward takes them. ``with_placeholders`` puts as many image / video / audio tokens in
the ids as the model's error message says its features need. All of it is read from the config, never per model.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

IMAGE = 64  # the fallback image side (``coverage_models.IMAGE`` is this one)
_MEL_FIELDS = ("num_mel_bins", "input_feat_per_channel", "n_mels", "mel_bins")
_PLACEHOLDERS = {"image": ("image_token_id", "image_token_index"), "video": ("video_token_id", "video_token_index"),
                 "audio": ("audio_token_id", "audio_token_index")}
_MISMATCH = re.compile(r"(Image|Video|Audio) features and \w+ tokens do not match,? tokens:? (\d+),? features:? (\d+)")


class NoInputs(Exception):
    """No input of the model's main kind can be made from its config."""


def _field(config: Any, names: tuple[str, ...]) -> int | None:
    """The first int field of ``names`` in the config or (depth first) one of its sub-configs."""
    d = config if isinstance(config, dict) else config.to_dict()
    for name in names:
        if isinstance(d.get(name), int) and not isinstance(d.get(name), bool):
            return d[name]
    for value in d.values():
        if isinstance(value, dict):
            found = _field(value, names)
            if found is not None:
                return found
    return None


_ORDINARY = {"pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id", "sep_token_id", "cls_token_id",
             "mask_token_id", "unk_token_id"}


def _placeholder_ids(config: Any) -> set[int]:
    """The token ids the config names beyond the ordinary ones (image / video / audio placeholders, …): text
    ids avoid them, since a model counts them as features to be filled in."""
    out: set[int] = set()

    def walk(d: dict[str, Any]) -> None:
        for key, value in d.items():
            if isinstance(value, dict):
                walk(value)
            elif isinstance(value, int) and isinstance(key, str) and key.endswith(("_token_id", "_token_index")) \
                    and key not in _ORDINARY:  # keys of a config's own dicts may be ints (Aria's patch → query)
                out.add(value)
    walk(config.to_dict())
    return out


def text_ids(config: Any, length: int = 8, batch: int = 2, g: torch.Generator | None = None) -> torch.Tensor:
    """Token ids in [3, min(vocabulary, 128)) of the text config that are no placeholder of the config."""
    g = g or torch.Generator().manual_seed(1)
    vocab = int(getattr(getattr(config, "text_config", None) or config, "vocab_size", None) or 128)
    high = max(4, min(vocab, 128))
    placeholders = _placeholder_ids(config)
    allowed = [i for i in range(3, high) if i not in placeholders] or [3]
    return torch.tensor(allowed)[torch.randint(0, len(allowed), (batch, length), generator=g)]


def ids(config: Any) -> dict[str, torch.Tensor]:
    """Token ids (2 × 8; decoder ids too for an encoder-decoder)."""
    g = torch.Generator().manual_seed(1)
    inputs = {"input_ids": text_ids(config, g=g)}
    if getattr(config, "is_encoder_decoder", False):
        inputs["decoder_input_ids"] = text_ids(config, g=g)
    return inputs


def pixels(config: Any) -> dict[str, torch.Tensor]:
    vision = getattr(config, "vision_config", None) or config
    size = getattr(vision, "image_size", None) or IMAGE
    size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
    channels = int(getattr(vision, "num_channels", None) or 3)
    g = torch.Generator().manual_seed(2)
    return {"pixel_values": torch.randn(1, channels, *size, generator=g, dtype=torch.float64)}


def _audio(kind: str, config: Any) -> Iterator[dict[str, torch.Tensor]]:
    """Raw audio, then mel features (bins from the config; frames = 2 × max_source_positions as Whisper
    wants, else the config's max_length, else 200) as (batch, bins, frames) and (batch, frames, bins)."""
    g = torch.Generator().manual_seed(3)
    mel = _field(config, _MEL_FIELDS)
    sources = _field(config, ("max_source_positions",))
    frames = 2 * sources if sources else (_field(config, ("max_length",)) or 200)
    if kind == "input_values":
        yield {kind: torch.randn(1, 4000, generator=g, dtype=torch.float64)}
    if mel:
        features = torch.randn(1, mel, frames, generator=g, dtype=torch.float64)
        yield {kind: features}
        yield {kind: features.transpose(1, 2).contiguous()}


def _extras(model: nn.Module, config: Any, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Decoder ids for an encoder-decoder whose main input is not text; layout boxes where the forward takes them."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return inputs
    out = dict(inputs)
    if "decoder_input_ids" in params and getattr(config, "is_encoder_decoder", False) and "input_ids" not in out:
        out["decoder_input_ids"] = text_ids(config)
    if "bbox" in params and "input_ids" in out:  # (x0, y0, x1, y1) on the 0–1000 grid, x0 ≤ x1, y0 ≤ y1
        g = torch.Generator().manual_seed(4)
        corner = torch.randint(0, 500, (*out["input_ids"].shape, 2), generator=g)
        out["bbox"] = torch.cat([corner, corner + torch.randint(0, 500, corner.shape, generator=g)], dim=-1)
    return out


def input_candidates(model: nn.Module, config: Any) -> Iterator[dict[str, torch.Tensor]]:
    """The inputs to try, in order (see the module docstring); NoInputs when the main kind cannot be made."""
    kind = getattr(model, "main_input_name", "input_ids")
    if kind == "input_ids":
        main = [ids(config)]
    elif kind == "pixel_values":
        main = [pixels(config)]
    elif kind in ("input_values", "input_features"):
        main = list(_audio(kind, config))
    else:
        main = []
    if not main:
        raise NoInputs(f"inputs of kind {kind!r} are not made by the coverage zoo")
    image_token = _field(config, _PLACEHOLDERS["image"])
    if kind == "input_ids" and image_token is not None and getattr(config, "vision_config", None) is not None:
        both = {**ids(config), **pixels(config)}  # a vision-language model: its vision tower too, first
        both["input_ids"][0, 0] = image_token  # one placeholder; the model's error says how many it needs
        yield _extras(model, config, both)
    for inputs in main:
        yield _extras(model, config, inputs)
    yield _extras(model, config, {**ids(config), **main[0], **pixels(config)})  # text and image together


def with_placeholders(inputs: dict[str, torch.Tensor], config: Any, error: BaseException) -> dict[str, Any] | None:
    """``inputs`` with as many placeholder tokens as the model said its features need ("Image features and
    image tokens do not match, tokens: 1, features: 4"), in the first row, the other rows text; None when the
    error is no such mismatch or the config names no placeholder token."""
    found = _MISMATCH.search(str(error))
    if not found or "input_ids" not in inputs:
        return None
    token = _field(config, _PLACEHOLDERS[found.group(1).lower()])
    if token is None:
        return None
    tokens, count = int(found.group(2)), int(found.group(3))
    if tokens == count:  # some models print features × width as "features" (LLaVA): the count is per width
        width = _field(getattr(config, "text_config", None) or config, ("hidden_size",)) or 0
        if not width or count % width:
            return None
        count //= width
    old = inputs["input_ids"]
    text = old[:, (old != token).all(0)]  # the columns free of this placeholder
    rows = text_ids(config, length=count + text.shape[1], batch=old.shape[0])
    rows[0] = torch.cat([torch.full((count,), token, dtype=old.dtype), text[0]])
    out = {**inputs, "input_ids": rows}
    if "bbox" in inputs:
        out["bbox"] = inputs["bbox"][:, :1].expand(-1, rows.shape[1], -1).contiguous()
    return out
