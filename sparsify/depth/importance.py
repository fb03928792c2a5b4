"""How much each residual branch matters: the relative change of its block's output once it is removed.

``branch_importance(model, branches, batches)[i]`` is the mean, over the batches, of
``‖M(x) − M_without_i(x)‖ / ‖M(x)‖`` for branch i's module M on the input it receives in the model (eval mode,
no gradients; the other branches kept). Zero for a branch that outputs zeros; an importance vector over depth,
to rank branches or to hand to a budget.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from sparsify._utils import evaluating
from sparsify.depth.branches import ResidualBranch
from sparsify.depth.calls import record_calls
from sparsify.depth.removal import without_branches
from sparsify.errors import SparsifyError

__all__ = ["branch_importance"]


def _first_tensor(value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    raise SparsifyError(f"a block's output is a {type(value).__name__}, not a tensor: its change cannot be measured")


def branch_importance(model: nn.Module, branches: Sequence[ResidualBranch], batches: Iterable[Any]) -> torch.Tensor:
    """One importance per branch (module docstring), float64 on the CPU. ``batches``: example inputs (each a
    tensor or a tuple of positional inputs), at least one."""
    if not branches:
        return torch.zeros(0, dtype=torch.float64)
    modules = {b.module: model.get_submodule(b.module) for b in branches}
    variants = [without_branches(modules[b.module], [b.add]) for b in branches]
    total = torch.zeros(len(branches), dtype=torch.float64)
    count = 0
    for batch in batches:
        calls = record_calls(model, batch, modules)
        with evaluating(model):
            for i, (b, variant) in enumerate(zip(branches, variants, strict=True)):
                call = calls.get(b.module)
                if call is None:
                    raise SparsifyError(f"{b.module!r} is not called on this batch: its branch cannot be scored")
                full = _first_tensor(call.output).double()
                cut = _first_tensor(variant(*call.args, **call.kwargs)).double()
                change = torch.linalg.vector_norm(cut - full) / torch.linalg.vector_norm(full).clamp_min(1e-30)
                total[i] += float(change)
        count += 1
    if count == 0:
        raise SparsifyError("branch_importance needs at least one batch")
    return total / count
