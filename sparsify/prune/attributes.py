"""Re-derive module attributes (in_channels, num_features, …) from sliced parameter shapes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

AttributeSync = Callable[[nn.Module, dict[str, Any]], None]
_SYNCS: dict[type[nn.Module], AttributeSync] = {}


def register_attribute_sync(cls: type[nn.Module]) -> Callable[[AttributeSync], AttributeSync]:
    """Decorator: ``fn(module, old_attributes)`` fixes ``cls`` attributes after its tensors are sliced."""

    def deco(fn: AttributeSync) -> AttributeSync:
        _SYNCS[cls] = fn
        return fn

    return deco


def sync_attributes(module: nn.Module, old: dict[str, Any]) -> None:
    for cls in type(module).__mro__:
        if cls in _SYNCS:
            _SYNCS[cls](module, old)
            return


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
