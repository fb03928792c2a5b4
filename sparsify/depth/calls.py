"""Record what each module receives and returns on one example forward (eval mode, no gradients)."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from sparsify._utils import evaluating
from sparsify.errors import SparsifyError

__all__ = ["ModuleCall", "record_calls", "run_model"]


@dataclass
class ModuleCall:
    """The first call of a module: its positional and keyword inputs and its output."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    output: Any

    def positional(self, gm: fx.GraphModule) -> list[Any]:
        """The inputs in the order of ``gm``'s placeholders (defaults filled), for ``fx.Interpreter.run``."""
        bound = inspect.signature(gm.forward).bind(*self.args, **self.kwargs)
        bound.apply_defaults()
        return list(bound.arguments.values())


def run_model(model: nn.Module, example_inputs: Any) -> Any:
    """``model(*example_inputs)`` (a tensor, or a tuple/list of positional inputs)."""
    args = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    return model(*args)


def _copied(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a named tuple
        return type(value)(*(_copied(v) for v in value))
    if isinstance(value, (tuple, list)):
        return type(value)(_copied(v) for v in value)
    if isinstance(value, dict):
        return {k: _copied(v) for k, v in value.items()}
    return value


def record_calls(model: nn.Module, example_inputs: Any, modules: Mapping[str, nn.Module]) -> dict[str, ModuleCall]:
    """The first call of each of ``modules`` (name → module) on ``model(example_inputs)``, in call order;
    modules the example does not call are absent."""
    calls: dict[str, ModuleCall] = {}
    inputs: dict[str, tuple[tuple[Any, ...], dict[str, Any]]] = {}
    handles = []

    def pre(name: str) -> Any:
        def record(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if name not in inputs:  # copied: the module (or a later one) may write into them in place
                inputs[name] = (_copied(args), _copied(kwargs))
        return record

    def post(name: str) -> Any:
        def record(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            if name not in calls:
                calls[name] = ModuleCall(*inputs[name], _copied(output))
        return record

    try:
        for name, module in modules.items():
            handles.append(module.register_forward_pre_hook(pre(name), with_kwargs=True))
            handles.append(module.register_forward_hook(post(name), with_kwargs=True))
        with evaluating(model):
            try:
                run_model(model, example_inputs)
            except Exception as exc:
                raise SparsifyError(f"the model failed on the example inputs ({type(exc).__name__}: {exc}); pass "
                                    "inputs it accepts: a tensor or a tuple of positional inputs") from exc
    finally:
        for h in handles:
            h.remove()
    return calls
