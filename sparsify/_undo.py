"""Put a model's module structure back exactly as it was, whatever was installed in between.

``ModelUndo(model)`` records every module's class and attributes (parameter, buffer and submodule
tables, hooks) and every parameter's and buffer's gradient hooks; ``restore()`` puts them back.
Tensor values are not copied: it undoes *installing* things (parametrizations, hooks, attributes),
which never writes into tensors. The Sparsifier constructor uses it to be atomic.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize


def _shallow(state: dict[str, Any]) -> dict[str, Any]:
    return {k: (type(v)(v) if isinstance(v, dict) else v) for k, v in state.items()}


class ModelUndo:
    """A record of ``model``'s module structure; ``restore()`` returns the model to it."""

    def __init__(self, model: nn.Module) -> None:
        self.modules = [(m, type(m), _shallow(vars(m))) for m in model.modules()]
        tensors: dict[int, torch.Tensor] = {}
        for m in model.modules():
            for t in (*m._parameters.values(), *m._buffers.values()):
                if t is not None:
                    tensors[id(t)] = t
        self.tensor_hooks = [(t, _copy_hooks(t)) for t in tensors.values()]

    def restore(self) -> None:
        for module, cls, state in self.modules:
            module.__class__ = cls
            module.__dict__.clear()
            module.__dict__.update(_shallow(state))
        for module, cls, _ in self.modules:  # after all tables are back (the parametrizations ModuleDict too)
            if parametrize.is_parametrized(module):  # remove_parametrizations deletes the class's properties
                for name in module.parametrizations:
                    if not isinstance(getattr(cls, name, None), property):
                        parametrize._inject_property(module, name)
        for t, hooks in self.tensor_hooks:
            t._backward_hooks = None if hooks is None else type(hooks)(hooks)


def _copy_hooks(t: torch.Tensor) -> Any:
    hooks = getattr(t, "_backward_hooks", None)
    return None if hooks is None else type(hooks)(hooks)


def live_sparsify_parametrizations(model: nn.Module) -> list[str]:
    """Qualified names of tensors that carry sparsify's own parametrizations (a live Sparsifier's)."""
    out = []
    for name, module in model.named_modules():
        if parametrize.is_parametrized(module):
            for attr, plist in module.parametrizations.items():
                if any(type(p).__module__.startswith("sparsify.") for p in plist):
                    out.append(f"{name}.{attr}" if name else attr)
    return out
