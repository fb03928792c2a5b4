"""Small idioms used across the package: dotted names to modules and tensors, replacing submodules, eval mode."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

__all__ = ["evaluating", "get_tensor", "is_meta", "owner_of", "set_submodule"]


def owner_of(model: nn.Module, qualified: str) -> tuple[nn.Module, str]:
    """``(module, attribute)`` of a dotted tensor name such as ``"layer1.0.conv1.weight"``."""
    module_name, _, attr = qualified.rpartition(".")
    return (model.get_submodule(module_name) if module_name else model), attr


def get_tensor(model: nn.Module, qualified: str) -> torch.Tensor:
    """The parameter or buffer of ``model`` named ``qualified`` (dotted, as in ``state_dict``)."""
    module, attr = owner_of(model, qualified)
    return getattr(module, attr)


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted ``name`` (``"features.3"``) by ``module``."""
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, module)


def is_meta(model: nn.Module) -> bool:
    """Whether any parameter or buffer of ``model`` lives on the meta device."""
    return any(t.is_meta for t in (*model.parameters(), *model.buffers()))


@contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """Eval mode and no gradients inside; every module's own mode is put back after."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, mode in modes:
            m.training = mode
