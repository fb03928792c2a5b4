"""Removed attention / MLP sub-blocks of Hugging Face decoder layers: the stubs that replace them, and their record.

A decoder layer adds ``attention(norm(h))`` and ``mlp(norm(h))`` to its residual stream ``h``. Removing a
sub-block replaces it by a stub that contributes zeros (and its input norm by ``nn.Identity``), so the
residual passes through. ``RemovedAttention`` still writes a one-channel placeholder of the right length
into a ``DynamicCache`` (1 value per token instead of heads × head_dim), so the cache's sequence lengths
and mask sizes stay right however many attentions are gone. Each stub keeps a meta-device copy of the
module it replaced (no memory) for reading widths (``full_sublayers``). The removed sub-blocks are
recorded in ``config.sparsify_removed_sublayers`` (``{"attention": [...], "mlp": [...]}``, layer
indices), which ``sparsify.hf.from_pretrained`` replays. ``sparsify.hf.depth`` removes them.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sparsify.errors import SparsifyError
from sparsify.graph.module_types import register_module_type

SUBLAYERS = "sparsify_removed_sublayers"
KINDS = ("attention", "mlp")


@dataclass(frozen=True)
class Layout:
    """Where a decoder layer of a family keeps its sub-blocks and their input norms."""

    attention: str = "self_attn"
    mlp: str = "mlp"
    attention_norm: str = "input_layernorm"
    mlp_norm: str = "post_attention_layernorm"

    def block(self, kind: str) -> str:
        return self.attention if kind == "attention" else self.mlp

    def norm(self, kind: str) -> str:
        return self.attention_norm if kind == "attention" else self.mlp_norm


#: Decoder families whose layers are ``h += attn(norm(h)); h += mlp(norm(h))`` (read from their code).
LAYOUTS: dict[str, Layout] = {t: Layout() for t in ("llama", "mistral", "mixtral", "qwen2", "qwen3")}


def layout_of(config: Any) -> Layout:
    model_type = getattr(config, "model_type", None)
    if model_type not in LAYOUTS:
        raise SparsifyError(f"depth pruning does not know the decoder layers of model_type {model_type!r}; supported: "
                            f"{sorted(LAYOUTS)} (pre-norm residual layers with self_attn and mlp). Another family "
                            "needs its layout in sparsify.hf.sublayers.LAYOUTS after checking its decoder code.")
    return LAYOUTS[model_type]


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder's list of layers (``model.model.layers`` of a causal LM, ``model.layers`` of the base model)."""
    layout_of(model.config)
    base = getattr(model, "base_model", model)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise SparsifyError(f"{type(model).__name__} has no decoder layer list (expected .layers on its base model "
                            f"{type(base).__name__})")
    return layers


def _meta_copy(module: nn.Module, config: Any) -> nn.Module:
    """A copy of ``module`` whose tensors are on the meta device (nothing is copied but shapes); shares ``config``."""
    memo: dict[int, Any] = {id(config): config}
    for t in (*module.parameters(), *module.buffers()):
        meta = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(meta, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else meta
    return copy.deepcopy(module, memo)


class _Removed(nn.Module):
    """A removed sub-block: contributes zeros; ``replaced`` is the original on the meta device (shapes only)."""

    def __init__(self, replaced: nn.Module, config: Any = None) -> None:
        super().__init__()
        self.__dict__["replaced"] = _meta_copy(replaced, config)  # not a submodule: not in state_dict

    def extra_repr(self) -> str:
        return f"replaces {type(self.replaced).__name__}"


class RemovedMLP(_Removed):
    """An MLP removed from a decoder layer: its contribution to the residual stream is zero."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(hidden_states)


def _cache_argument(kwargs: dict[str, Any]) -> Any:
    for name in ("cache", "past_key_values", "past_key_value"):  # transformers 5 / 4.5x / older
        if kwargs.get(name) is not None:
            return kwargs[name]
    return None


class RemovedAttention(_Removed):
    """An attention removed from a decoder layer: zero contribution, and a placeholder in the KV cache."""

    def __init__(self, replaced: nn.Module, config: Any = None) -> None:
        layer_idx = getattr(replaced, "layer_idx", None)
        super().__init__(replaced, config)
        self.layer_idx = layer_idx

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
        cache = _cache_argument(kwargs)
        if cache is not None and self.layer_idx is not None:
            # one channel per token keeps the cache layer's length (positions, masks) right
            stub = hidden_states.new_zeros(hidden_states.shape[0], 1, hidden_states.shape[1], 1)
            cache.update(stub, stub, self.layer_idx)
        return torch.zeros_like(hidden_states), None


for _cls in (RemovedMLP, RemovedAttention):  # forward() reads every size from its input's shape
    register_module_type(_cls, synced_sizes=True)


def is_removed(module: Any) -> bool:
    return isinstance(module, _Removed)


def removed_sublayers(model: nn.Module) -> dict[str, list[int]]:
    """Which sub-blocks of which layers are removed, read from the model's modules."""
    layout = layout_of(model.config)
    layers = decoder_layers(model)
    return {kind: [i for i, layer in enumerate(layers) if is_removed(getattr(layer, layout.block(kind)))]
            for kind in KINDS}


def stub_(layer: nn.Module, layout: Layout, kind: str, config: Any) -> None:
    """Replace ``kind``'s sub-block of ``layer`` by its stub and its input norm by ``nn.Identity``; in place."""
    block = getattr(layer, layout.block(kind))
    setattr(layer, layout.block(kind), (RemovedAttention if kind == "attention" else RemovedMLP)(block, config))
    setattr(layer, layout.norm(kind), nn.Identity())


def write_record(config: Any, removed: dict[str, list[int]]) -> None:
    """Record ``removed`` in the config (or remove the entry when nothing is removed)."""
    if any(removed.values()):
        setattr(config, SUBLAYERS, {kind: sorted(removed.get(kind, [])) for kind in KINDS})
    elif hasattr(config, SUBLAYERS):
        delattr(config, SUBLAYERS)


def read_record(config: Any, error: type[SparsifyError] = SparsifyError) -> dict[str, list[int]] | None:
    """The validated ``config.sparsify_removed_sublayers``, or None."""
    raw = getattr(config, SUBLAYERS, None)
    if raw is None:
        return None
    n = int(config.num_hidden_layers)
    try:
        record = {str(k): sorted(int(i) for i in v) for k, v in dict(raw).items()}
    except (TypeError, ValueError) as exc:
        raise error(f"config.{SUBLAYERS} must map 'attention'/'mlp' to lists of layer indices, "
                    f"got {raw!r:.200}") from exc
    bad = [k for k in record if k not in KINDS] + [f"{k}[{i}]" for k, v in record.items() for i in v if not 0 <= i < n]
    if bad:
        raise error(f"config.{SUBLAYERS} has invalid entries {bad} (kinds {list(KINDS)}, layers 0..{n - 1})")
    return {kind: record.get(kind, []) for kind in KINDS}


def apply_record(model: nn.Module, checkpoint_keys: Iterable[str], error: type[SparsifyError]) -> nn.Module:
    """Stub the sub-blocks ``model.config`` records as removed (after loading a checkpoint saved without them),
    and check that the checkpoint's tensors are exactly those of the model so made."""
    record = read_record(model.config, error) or {}
    layout = layout_of(model.config)
    layers = decoder_layers(model)
    for kind in KINDS:
        for i in record.get(kind, []):
            if not is_removed(getattr(layers[i], layout.block(kind))):
                stub_(layers[i], layout, kind, model.config)
    keys = set(checkpoint_keys)
    state = model.state_dict()
    extra = sorted(keys - set(state))
    stored = {t.data_ptr() for k, t in state.items() if k in keys}
    missing = sorted(k for k, t in state.items() if k not in keys and t.data_ptr() not in stored)
    if extra or missing:
        raise error(f"the checkpoint does not fit config.{SUBLAYERS} ({record}): "
                    f"{'tensors of removed sub-blocks: ' + str(extra[:3]) if extra else ''}"
                    f"{'tensors it lacks: ' + str(missing[:3]) if missing else ''}. Save the model again with "
                    "sparsify.hf.save_pretrained.")
    return model


@contextlib.contextmanager
def full_sublayers(model: nn.Module) -> Iterator[None]:
    """Put the meta-device originals of removed sub-blocks back for the duration (reading and resizing widths
    of every layer); the stubs return afterwards. A no-op for models without removed sub-blocks."""
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) not in LAYOUTS:
        yield
        return
    layout = layout_of(config)
    swapped = []
    for layer in decoder_layers(model):
        for kind in KINDS:
            stub = getattr(layer, layout.block(kind))
            if is_removed(stub):
                layer._modules[layout.block(kind)] = stub.replaced
                swapped.append((layer, layout.block(kind), stub))
    try:
        yield
    finally:
        for layer, name, stub in swapped:
            layer._modules[name] = stub
