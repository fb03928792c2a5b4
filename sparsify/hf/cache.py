"""Hugging Face key/value caches as pytree nodes, so that a decoder with ``use_cache=True`` traces.

A decoder run with ``use_cache`` on returns its cache (``DynamicCache``, ``EncoderDecoderCache``, a
model's own ``*Cache``) in its outputs; ``torch.export`` refuses an output type that is not a pytree
node. Before torch.export traces a transformers model, :func:`register_cache_pytrees` registers
transformers' cache classes with transformers' own helpers (``exporters.exporter_dynamo`` where it
exists, else ``integrations.executorch.register_dynamic_cache_export_support``); the cache's tensors
then become outputs of the graph like any other, and the oracle compares them too.

Nothing is imported here until a transformers model is traced: ``transformers`` must already be loaded
(the model comes from it), so ``import sparsify`` stays light.
"""

from __future__ import annotations

import sys

from torch import nn

from sparsify.graph.trace import register_export_hook


def register_cache_pytrees(model: nn.Module) -> None:
    """Register the cache classes ``model`` may return as pytree nodes (idempotent; a no-op for a model
    that is not a transformers model)."""
    if "transformers" not in sys.modules or not type(model).__module__.startswith("transformers."):
        return
    try:
        from transformers.exporters.exporter_dynamo import register_cache_pytrees_for_model
    except ImportError:  # transformers before the exporters package: DynamicCache only
        from transformers.integrations.executorch import register_dynamic_cache_export_support

        register_dynamic_cache_export_support()
        return
    register_cache_pytrees_for_model(model)


register_export_hook(register_cache_pytrees)
