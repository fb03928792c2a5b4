"""Hugging Face transformers: config sync, save/load of pruned models, head-dimension slots, depth pruning,
hidden size with calibrated compensation.

``sparsify.hf.attention`` (the explicit-attention modules) imports transformers; this package face does not.
"""

from sparsify.hf.depth import remove_layers as remove_layers
from sparsify.hf.depth import remove_sublayers as remove_sublayers
from sparsify.hf.depth_importance import layer_importance as layer_importance
from sparsify.hf.families import Family as Family
from sparsify.hf.families import register_family as register_family
from sparsify.hf.hidden import hidden_importance as hidden_importance
from sparsify.hf.hidden import prune_hidden as prune_hidden
from sparsify.hf.pretrained import HEAD_DIMS as HEAD_DIMS
from sparsify.hf.pretrained import RECORD as RECORD
from sparsify.hf.pretrained import explicit_attention_ as explicit_attention_
from sparsify.hf.pretrained import from_pretrained as from_pretrained
from sparsify.hf.pretrained import head_dims as head_dims
from sparsify.hf.pretrained import layer_widths as layer_widths
from sparsify.hf.pretrained import save_pretrained as save_pretrained
from sparsify.hf.pretrained import sync_config as sync_config

__all__ = [
    "HEAD_DIMS",
    "RECORD",
    "Family",
    "explicit_attention_",
    "from_pretrained",
    "head_dims",
    "hidden_importance",
    "layer_importance",
    "layer_widths",
    "prune_hidden",
    "register_family",
    "remove_layers",
    "remove_sublayers",
    "save_pretrained",
    "sync_config",
]
