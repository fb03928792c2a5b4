"""The checks ``Sparsifier`` makes of its arguments, its model and a state to load, before anything changes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from sparsify._undo import live_sparsify_parametrizations
from sparsify.config import SparsifierConfig
from sparsify.errors import SparsifyError


def check_model(model: Any) -> None:
    if not isinstance(model, nn.Module):
        what = f"the class {model.__name__}" if isinstance(model, type) else f"a {type(model).__name__}"
        raise SparsifyError(f"Sparsifier takes the nn.Module to sparsify first, got {what}; pass the model instance "
                            "itself (e.g. Sparsifier(model, example_inputs, ...)), not its class, a function or a "
                            "checkpoint")


def check_config(config: Any) -> None:
    if config is None or isinstance(config, SparsifierConfig):
        return
    if isinstance(config, (str, Path)):
        fix = f"load it with config=SparsifierConfig.from_yaml({str(config)!r})"
    elif isinstance(config, dict):
        fix = "build it with config=SparsifierConfig(**config) (or SparsifierConfig.model_validate(config))"
    else:
        fix = "pass a SparsifierConfig, or adapter=/policy= without config="
    raise SparsifyError(f"config must be a SparsifierConfig, got {type(config).__name__}: {fix}")


def tied_elsewhere(model: nn.Module, module: nn.Module, attr: str) -> str | None:
    """Another module's name for the tensor ``module.attr`` (tied weights), or None if no other module holds it."""
    tensor = module._parameters.get(attr, module._buffers.get(attr))
    if tensor is None:
        return None
    for name, other in model.named_modules(remove_duplicate=False):
        if other is module:
            continue
        for table in (other._parameters, other._buffers):
            for key, t in table.items():
                if t is tensor:
                    return f"{name}.{key}" if name else key
    return None


def placement(model: nn.Module) -> set[tuple[str, torch.dtype]]:
    """The (device, dtype) pairs of the model's parameters and buffers."""
    return {(str(t.device), t.dtype) for t in (*model.parameters(), *model.buffers())}


def check_no_live_sparsifier(model: nn.Module) -> None:
    live = live_sparsify_parametrizations(model)
    if live:
        raise SparsifyError(f"the model already carries a Sparsifier's masks/thresholds (on {', '.join(live[:3])}"
                            f"{' …' if len(live) > 3 else ''}): two Sparsifiers on one model would stack them. Finish "
                            "the first one with its prune() and build the new Sparsifier on the pruned model, or build "
                            "it on a fresh copy of the model")


def check_state(state: Any) -> None:
    keys = {"step_count", "config", "policy", "transforms"}
    if not isinstance(state, dict) or not keys <= state.keys():
        got = (f"a dict with keys {sorted(map(str, state))[:5]}" if isinstance(state, dict)
               else f"a {type(state).__name__}")
        hint = (" (that looks like a model's state_dict: load it with model.load_state_dict)"
                if isinstance(state, dict) and any(isinstance(v, torch.Tensor) for v in state.values()) else "")
        raise SparsifyError(f"load_state_dict takes what Sparsifier.state_dict() returned (keys {sorted(keys)}), got "
                            f"{got}{hint}; for a file, pass torch.load(path)[...] of what you saved")
