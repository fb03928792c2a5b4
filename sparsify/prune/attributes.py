"""Re-derive module attributes (in_channels, num_features, …) from sliced parameter shapes.

The sync table is ``sparsify.graph.module_types.ATTRIBUTE_SYNCS`` (one registration per module type:
``register_module_type(cls, sync=fn)``); this module applies it after surgery and declares the syncs of
torch.nn types. Those of other packages live with them (``sparsify.hf.syncs``, ``sparsify.nn``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from sparsify.graph.module_types import AttributeSync, attribute_sync_of, register_module_type


def register_attribute_sync(cls: type[nn.Module] | str) -> Callable[[AttributeSync], AttributeSync]:
    """Decorator: ``fn(module, old_attributes)`` fixes ``cls`` attributes after its tensors are sliced
    (the ``sync=`` of :func:`~sparsify.graph.module_types.register_module_type`).

    ``cls`` may be a dotted class name (``"transformers.pytorch_utils.Conv1D"``: no import needed).
    A module whose own tensors are untouched is synced too when a descendant's are (an attention
    module's head counts follow its q/k/v projections), after its descendants."""

    def deco(fn: AttributeSync) -> AttributeSync:
        register_module_type(cls, sync=fn)
        return fn

    return deco


def sync_attributes(module: nn.Module, old: dict[str, Any]) -> None:
    fn = attribute_sync_of(module)
    if fn is not None:
        fn(module, old)


def modules_to_sync(model: nn.Module, touched: list[str]) -> list[str]:
    """``touched`` plus their ancestors that have an attribute sync, deepest first."""
    names = dict.fromkeys(touched)
    for name in touched:
        parts = name.split(".") if name else []
        for k in range(len(parts) - 1, -1, -1):
            parent = ".".join(parts[:k])
            if parent not in names and attribute_sync_of(model.get_submodule(parent)) is not None:
                names[parent] = None
    return sorted(names, key=lambda n: -(n.count(".") + 1 if n else 0))


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


def _linear(m: nn.Linear, old: dict[str, Any]) -> None:
    m.out_features, m.in_features = m.weight.shape


def _norm(m: nn.modules.batchnorm._NormBase, old: dict[str, Any]) -> None:
    t = m.weight if m.weight is not None else m.running_mean
    if t is not None:
        m.num_features = t.shape[0]


def _group_norm(m: nn.GroupNorm, old: dict[str, Any]) -> None:
    per_group = old["num_channels"] // old["num_groups"]
    m.num_channels = m.weight.shape[0]
    m.num_groups = m.num_channels // per_group


def _layer_norm(m: nn.LayerNorm, old: dict[str, Any]) -> None:
    if m.weight is not None:
        m.normalized_shape = tuple(m.weight.shape)


def _embedding(m: nn.Embedding, old: dict[str, Any]) -> None:
    m.num_embeddings, m.embedding_dim = m.weight.shape


def _prelu(m: nn.PReLU, old: dict[str, Any]) -> None:
    m.num_parameters = m.weight.shape[0]


def _rnn(m: nn.RNNBase, old: dict[str, Any]) -> None:
    gates = {"LSTM": 4, "GRU": 3}.get(m.mode, 1)
    m.hidden_size = m.weight_hh_l0.shape[0] // gates
    m.input_size = m.weight_ih_l0.shape[1]
    if m.proj_size:
        m.proj_size = m.weight_hr_l0.shape[0]
    m._init_flat_weights()  # forward() reads _flat_weights; surgery replaced the Parameters behind it


# the built-in torch.nn syncs (their op rules are in sparsify.graph.rules)
register_module_type(nn.modules.conv._ConvNd, sync=_conv)
register_module_type(nn.Linear, sync=_linear)
register_module_type(nn.modules.batchnorm._NormBase, sync=_norm)
register_module_type(nn.GroupNorm, sync=_group_norm)
register_module_type(nn.LayerNorm, sync=_layer_norm)
register_module_type(nn.Embedding, sync=_embedding)
register_module_type(nn.PReLU, sync=_prelu)
register_module_type(nn.RNNBase, sync=_rnn)
if hasattr(nn, "RMSNorm"):
    register_module_type(nn.RMSNorm, sync=_layer_norm)
