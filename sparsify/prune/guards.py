"""Checks ``prune_channels`` makes before it touches anything: the model is still the one the channel
graph describes, its tensors can be sliced, and the optimizer's state can be sliced with them.

Each raises :class:`PruneError` naming the problem and the fix; none changes the model or the optimizer.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from sparsify.errors import PruneError, SparsifyError
from sparsify.graph.channel_graph import ChannelGroup


def _holder(model: nn.Module, qualified: str) -> tuple[nn.Module | None, str]:
    module_name, _, attr = qualified.rpartition(".")
    try:
        return (model.get_submodule(module_name) if module_name else model), attr
    except AttributeError:
        return None, attr


def check_model_matches(model: nn.Module, groups: Iterable[ChannelGroup]) -> None:
    """Every member of ``groups`` is still a plain parameter or buffer of ``model`` with the size the
    graph recorded; a parametrized one (a live Sparsifier's masks, a weight_norm added later) is refused."""
    for group in groups:
        for m in group.members:
            module, attr = _holder(model, m.tensor)
            if module is not None and parametrize.is_parametrized(module, attr):
                kinds = [type(p) for p in module.parametrizations[attr]]
                names = ", ".join(k.__name__ for k in kinds)
                if all(k.__module__.startswith("sparsify.") for k in kinds):
                    raise PruneError(
                        f"{m.tensor} still carries a Sparsifier's masks/thresholds ({names}); "
                        "prune it with that Sparsifier's prune(), which bakes them first, not with prune_channels")
                raise PruneError(
                    f"{m.tensor} is parametrized ({names}) but was not when the channel "
                    "graph was built: the model changed. Remove the parametrization (torch.nn.utils.parametrize."
                    "remove_parametrizations(..., leave_parametrized=True)) or rebuild the graph, which refuses it")
            tensor = None if module is None else (module._parameters.get(attr) if attr in module._parameters
                                                  else module._buffers.get(attr))
            if tensor is None:
                raise PruneError(f"the model has no parameter or buffer {m.tensor} (group '{group.name}'): it changed "
                                 "since the channel graph was built. Rebuild it with build_channel_graph(model, "
                                 "example_inputs) (or a new Sparsifier) on the model as it is now")
            if tensor.dim() <= m.dim or tensor.shape[m.dim] != len(m.structure_of):
                raise PruneError(f"{m.tensor} has shape {tuple(tensor.shape)}, but the channel graph expects "
                                 f"{len(m.structure_of)} entries on dim {m.dim}: the model changed since the graph was "
                                 "built. Rebuild it with build_channel_graph(model, example_inputs) on the model as it "
                                 "is now")


def check_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer | None, sliced: Iterable[str]) -> None:
    """The optimizer optimizes this model, and the state of every parameter that will be sliced is
    per-element (same shape as the parameter) or a scalar, so slicing it along the parameter is exact."""
    if optimizer is None:
        return
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise PruneError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if isinstance(optimizer, torch.optim.LBFGS):
        raise PruneError("LBFGS keeps its history as flat vectors over all parameters, which cannot be sliced "
                         "with them; prune with optimizer=None and create a new LBFGS over the pruned model")
    own = {id(p) for p in model.parameters()}
    held = [p for group in optimizer.param_groups for p in group["params"]]
    if held and not any(id(p) in own for p in held):
        raise PruneError(f"the optimizer holds {len(held)} parameters, none of them this model's (was it built for "
                         "another model, or for a copy of this one?); pass the optimizer over this model's "
                         "parameters, or optimizer=None")
    for name in sorted(set(sliced)):
        module, attr = _holder(model, name)
        param = None if module is None else module._parameters.get(attr)
        state = optimizer.state.get(param) if param is not None else None
        for key, value in (state or {}).items():
            nested = isinstance(value, (list, tuple, dict))  # surgery slices top-level tensors only
            tensors = [value] if isinstance(value, torch.Tensor) else [
                v for v in (value.values() if isinstance(value, dict) else value)
                if isinstance(v, torch.Tensor)] if nested else []
            for t in tensors:
                if (nested or t.shape != param.shape) and t.numel() > 1:
                    raise PruneError(
                        f"the optimizer's state {key!r} of {name} has shape {tuple(t.shape)}, not the parameter's "
                        f"{tuple(param.shape)}, so it cannot be sliced with it ({type(optimizer).__name__}); prune "
                        "with optimizer=None and create a new optimizer over the pruned model")


# Hooks known to observe without changing a value: transformers installs its output-capturing hooks on a model's
# layers at the first forward (they record hidden states / attentions when asked, and return None), and
# `enable_input_require_grads` flips requires_grad on the embedding's output.
_OBSERVING_HOOKS = {
    ("transformers.utils.output_capturing", "install_output_capuring_hook.<locals>.output_capturing_hook"),
    ("transformers.modeling_utils", "PreTrainedModel.enable_input_require_grads.<locals>.make_inputs_require_grads"),
}


def _observes_only(hook: Any) -> bool:
    return (getattr(hook, "__module__", None), getattr(hook, "__qualname__", None)) in _OBSERVING_HOOKS


def check_no_forward_hooks(model: nn.Module, what: str, error: type[SparsifyError] = PruneError) -> None:
    """Refuse a model whose submodules carry forward (pre-)hooks: the channel graph does not see what a hook does
    to the channels (one that reorders or rescales them would make pruning silently change the function). Hooks
    known only to observe (transformers' output capturing) are allowed."""
    hooked = [(name, fn) for name, m in model.named_modules() if name
              for fn in (*m._forward_pre_hooks.values(), *m._forward_hooks.values()) if not _observes_only(fn)]
    old_style = sorted({n for n, fn in hooked if type(fn).__name__ in ("WeightNorm", "SpectralNorm")})
    if old_style:  # torch.nn.utils.weight_norm / spectral_norm (deprecated) recompute the weight in a pre-hook
        raise error(f"{what}: {', '.join(map(repr, old_style[:3]))} carry the deprecated hook-based weight_norm / "
                    "spectral_norm, whose recomputed weight the channel graph cannot slice. Bake it in with "
                    "torch.nn.utils.remove_weight_norm(module) (remove_spectral_norm) before this call, or use "
                    "torch.nn.utils.parametrizations.weight_norm, which the graph reads")
    if hooked:
        names = ", ".join(f"{n!r} ({getattr(fn, '__qualname__', type(fn).__name__)})" for n, fn in hooked[:3])
        raise error(f"{what}: submodules of the model carry forward hooks ({names}{' …' if len(hooked) > 3 else ''}); "
                    "the channel graph cannot see what a hook does to the channels, so pruning through it could change "
                    "the function silently. Remove them (handle.remove()) before this call and register them again on "
                    "the pruned model")
