"""The exactness oracle for depth: zero residual branches softly, remove them physically, compare outputs."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from sparsify._utils import evaluating, set_submodule
from sparsify.depth.branches import ResidualBranch, trace_block
from sparsify.depth.calls import run_model
from sparsify.depth.removal import remove_residual_branches

__all__ = ["check_branch_removal", "soft_zeroed_branches"]


def soft_zeroed_branches(model: nn.Module, branches: Sequence[ResidualBranch]) -> nn.Module:
    """A deep copy of ``model`` whose branches still compute but whose outputs are multiplied by zero."""
    soft = copy.deepcopy(model)
    by_module: dict[str, list[str]] = {}
    for b in branches:
        by_module.setdefault(b.module, []).append(b.output)
    for name, outputs in by_module.items():
        gm = trace_block(soft.get_submodule(name))
        for node in list(gm.graph.nodes):
            if node.name in outputs:
                with gm.graph.inserting_after(node):
                    zeroed = gm.graph.call_function(torch.mul, (node, 0.0))
                node.replace_all_uses_with(zeroed, delete_user_cb=lambda user, z=zeroed: user is not z)
        gm.recompile()
        set_submodule(soft, name, gm)
    return soft


def check_branch_removal(model: nn.Module, example_inputs: Any, branches: Sequence[ResidualBranch]) -> float:
    """Max abs difference between the soft-zeroed model and a copy with the branches removed (eval mode)."""
    soft = soft_zeroed_branches(model, branches)
    pruned = copy.deepcopy(model)
    remove_residual_branches(pruned, branches)
    with evaluating(soft), evaluating(pruned):
        expected, got = run_model(soft, example_inputs), run_model(pruned, example_inputs)
    return float((expected - got).abs().max()) if expected.numel() else 0.0


