"""Depth pruning of Hugging Face decoders: remove whole layers, or their attention / MLP sub-blocks.

A decoder layer is a residual block (``h += attn(norm(h)); h += mlp(norm(h))``): where its residual
contributions are zero (``o_proj`` and ``down_proj`` zeroed), removing it is exact. ``remove_layers``
takes layers out of ``model.model.layers`` and keeps the config right (``num_hidden_layers``,
``layer_types`` of the kept layers, per-layer records renumbered) and renumbers every kept module's
``layer_idx`` so a ``DynamicCache`` works: the shallower model is described by its config alone.
``remove_sublayers`` replaces sub-blocks by stubs (``sparsify.hf.sublayers``) recorded in the config.
Both are all-or-nothing. Importance vectors to choose what to remove: ``sparsify.hf.depth_importance``.
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Iterable
from typing import Any

from torch import nn

from sparsify._undo import ModelUndo
from sparsify.errors import PruneError, SparsifyError
from sparsify.hf import sublayers
from sparsify.hf.inputs import check_model
from sparsify.hf.pretrained import HEAD_DIMS, RECORD

_PER_LAYER_RECORDS = (RECORD, HEAD_DIMS)  # config entries keyed by layer index (str)


def _indices(values: Iterable[int] | None, n: int, what: str) -> list[int]:
    if values is None:
        return []
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable) or getattr(values, "ndim", 1) == 0:
        raise SparsifyError(f"{what} must be a list of layer indices, got {type(values).__name__}")
    out = []
    for v in values:
        try:
            i = operator.index(v)  # ints, numpy and 0-d torch integers
        except TypeError:
            i = None
        if i is None or isinstance(v, bool):
            raise SparsifyError(f"{what}: layer indices must be integers, got {v!r}")
        if not 0 <= i < n:
            raise SparsifyError(f"{what}: layer {i} does not exist; the decoder has layers 0..{n - 1}")
        out.append(i)
    if len(set(out)) != len(out):
        raise SparsifyError(f"{what}: layer indices repeat ({out}); name each layer once")
    return sorted(out)


def _decoder(model: nn.Module, what: str) -> nn.ModuleList:
    """The decoder layers, after checking the model and that its config counts them right."""
    check_model(model, what)
    decoder = sublayers.decoder_layers(model)
    stated = getattr(model.config, "num_hidden_layers", None)
    if stated != len(decoder):
        raise SparsifyError(f"{what}: config.num_hidden_layers is {stated} but the model has {len(decoder)} decoder "
                            f"layers (config edited by hand?); set model.config.num_hidden_layers = {len(decoder)}")
    return decoder


def _renumber(raw: Any, keep: list[int]) -> dict[str, Any]:
    new_of = {old: new for new, old in enumerate(keep)}
    return {str(new_of[int(k)]): v for k, v in dict(raw).items() if int(k) in new_of}


def _transaction(model: nn.Module, change: Any) -> None:
    """Run ``change()``; if it raises, put the modules and the config back as they were."""
    undo = ModelUndo(model)
    config_state = copy.deepcopy(vars(model.config))
    try:
        change()
        if callable(getattr(model.config, "validate", None)):
            model.config.validate()
    except Exception as exc:
        undo.restore()
        vars(model.config).clear()
        vars(model.config).update(config_state)
        if isinstance(exc, SparsifyError):
            raise
        raise PruneError(f"depth pruning failed and the model was left unchanged: {type(exc).__name__}: {exc}") from exc


def remove_layers(model: nn.Module, layers: Iterable[int]) -> nn.Module:
    """Remove decoder layers ``layers`` (indices) from ``model``; in place, returns the model.

    Exact where the removed layers' residual contributions are zero; otherwise the model is the one
    without those layers (ShortGPT-style depth pruning; choose them with ``layer_importance``). Updates
    ``config.num_hidden_layers``, ``config.layer_types`` (sliding/full attention of the kept layers),
    the per-layer records of ``sparsify.hf`` (widths, head_dim slots, removed sub-blocks) and the
    ``layer_idx`` of every kept module (KV-cache slots). Raises ``SparsifyError`` for an unknown family
    or bad indices, and leaves the model unchanged on any error.
    """
    decoder = _decoder(model, "remove_layers")
    n = len(decoder)
    drop = _indices(layers, n, "remove_layers")
    if len(drop) == n:
        raise SparsifyError(f"remove_layers would remove all {n} decoder layers; keep at least one")
    keep = [i for i in range(n) if i not in drop]
    config = model.config
    removed = sublayers.removed_sublayers(model)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and len(layer_types) != n:
        raise SparsifyError(f"config.layer_types has {len(layer_types)} entries for {n} layers; fix the config first")

    def change() -> None:
        kept = [decoder[i] for i in keep]
        for old in reversed(range(n)):
            del decoder[old]
        decoder.extend(kept)
        for new, layer in enumerate(kept):
            for m in layer.modules():
                if isinstance(getattr(m, "layer_idx", None), int):
                    m.layer_idx = new
        config.num_hidden_layers = len(keep)
        if layer_types is not None:
            config.layer_types = [layer_types[i] for i in keep]
            base = getattr(model, "base_model", model)
            if hasattr(base, "has_sliding_layers"):  # Qwen2/3 build the sliding mask only where a layer uses it
                base.has_sliding_layers = "sliding_attention" in config.layer_types
        for key in _PER_LAYER_RECORDS:
            if getattr(config, key, None) is not None:
                setattr(config, key, _renumber(getattr(config, key), keep))
        new_of = {old: new for new, old in enumerate(keep)}
        sublayers.write_record(config, {k: [new_of[i] for i in v if i in new_of] for k, v in removed.items()})

    _transaction(model, change)
    return model


def remove_sublayers(model: nn.Module, attention: Iterable[int] | None = None,
                     mlp: Iterable[int] | None = None) -> nn.Module:
    """Remove the attention sub-blocks of layers ``attention`` and the MLPs of layers ``mlp``; in place.

    Each is replaced by a stub contributing zeros (its input norm by ``nn.Identity``): exact where the
    sub-block's output projection (``o_proj`` / ``down_proj``) is zero. A removed attention keeps a
    one-channel placeholder in the KV cache, so generation with ``use_cache=True`` works. Recorded in
    ``config.sparsify_removed_sublayers`` (``sparsify.hf.save_pretrained`` / ``from_pretrained`` keep it).
    A layer losing both sub-blocks is refused: remove it with ``remove_layers``. All-or-nothing.
    """
    decoder = _decoder(model, "remove_sublayers")
    layout = sublayers.layout_of(model.config)
    n = len(decoder)
    asked = {"attention": _indices(attention, n, "remove_sublayers(attention=)"),
             "mlp": _indices(mlp, n, "remove_sublayers(mlp=)")}
    removed = sublayers.removed_sublayers(model)
    for kind, layers in asked.items():
        again = sorted(set(layers) & set(removed[kind]))
        if again:
            raise SparsifyError(f"the {kind} of layer(s) {again} is already removed; name only present sub-blocks")
    after = {kind: sorted({*removed[kind], *asked[kind]}) for kind in sublayers.KINDS}
    empty = sorted(set(after["attention"]) & set(after["mlp"]))
    if empty:
        raise SparsifyError(f"layer(s) {empty} would lose both attention and MLP; remove whole layers with "
                            f"sparsify.hf.remove_layers(model, {empty}) instead")

    def change() -> None:
        for kind, layers in asked.items():
            for i in layers:
                sublayers.stub_(decoder[i], layout, kind, model.config)
        sublayers.write_record(model.config, after)

    _transaction(model, change)
    return model
