"""The exactness oracle: zero channels softly, prune them physically, compare outputs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from sparsify._utils import get_tensor
from sparsify.graph.channel_graph import ChannelGraph, ChannelGroup, build_channel_graph
from sparsify.graph.trace import as_args
from sparsify.prune.select import protect_members
from sparsify.prune.surgery import PruneReport, prune_channels

PRODUCING_ROLES = ("out", "scale", "value")


def soft_zero_(model: nn.Module, groups: Sequence[ChannelGroup], plan: Mapping[int, np.ndarray],
               keep_bias: bool = False) -> None:
    """Zero, in place, every producing member of the planned structures (and biases unless
    ``keep_bias``): the channels then contribute nothing, or only constants."""
    roles = PRODUCING_ROLES if keep_bias else (*PRODUCING_ROLES, "bias")
    by_id = {g.id: g for g in groups}
    with torch.no_grad():
        for gid, structures in plan.items():
            for m in by_id[gid].members:
                if m.role in roles:
                    t = get_tensor(model, m.tensor)
                    idx = torch.as_tensor(m.indices(structures), device=t.device)
                    t.index_fill_(m.dim, idx, 0.0)


def random_plan(cg: ChannelGraph, fraction: float = 0.5, seed: int = 0, exact_only: bool = True
                ) -> dict[int, np.ndarray]:
    """About ``fraction`` of the structures of every prunable (and, by default, exact) group."""
    rng = np.random.default_rng(seed)
    plan = {}
    for g in cg.prunable_groups():
        if exact_only and not g.exact:
            continue
        k = min(max(1, round(g.width * fraction)), g.width - 1)
        if k > 0:
            removed, _ = protect_members(g, np.sort(rng.choice(g.width, size=k, replace=False)))
            if len(removed):
                plan[g.id] = removed
    return plan


def _outputs(model: nn.Module, example_inputs: Any) -> list[torch.Tensor]:
    args, kwargs = as_args(example_inputs)
    with torch.no_grad():
        out = model(*args, **kwargs)
    flat, _ = torch.utils._pytree.tree_flatten(out)
    return [t for t in flat if isinstance(t, torch.Tensor)]


@dataclass
class OracleResult:
    max_abs_diff: float
    output_scale: float  # max |output| of the soft model
    groups_pruned: int
    report: PruneReport
    graph: ChannelGraph


def check_exactness(model: nn.Module, example_inputs: Any, fraction: float = 0.5, seed: int = 0,
                    keep_bias: bool = False, graph: ChannelGraph | None = None) -> OracleResult:
    """Soft-zero ~``fraction`` of every exact prunable group, prune physically, compare outputs.

    The model is switched to eval mode and modified in place. With ``keep_bias`` the zeroed
    channels still emit their biases (the BN-β folding case); only groups whose consumers can
    absorb constants exactly are then pruned. ``graph``: the model's channel graph, built before
    (e.g. traced under one kernel choice and run under another: Hugging Face's grouped_mm experts
    trace but have no float64 CPU kernel); by default it is built here.
    """
    model.eval()
    cg = graph if graph is not None else build_channel_graph(model, example_inputs)
    plan = random_plan(cg, fraction, seed)
    if keep_bias:
        plan = {gid: s for gid, s in plan.items() if _foldable(cg.group(gid), model)}
    soft_zero_(model, cg.groups, plan, keep_bias=keep_bias)
    reference = _outputs(model, example_inputs)
    report = prune_channels(cg, plan)
    pruned = _outputs(model, example_inputs)
    diff = max((float((a - b).abs().max()) for a, b in zip(reference, pruned, strict=True)), default=0.0)
    scale = max((float(a.abs().max()) for a in reference if a.numel()), default=0.0)
    return OracleResult(diff, scale, len(plan), report, cg)


def _foldable(group: ChannelGroup, model: nn.Module) -> bool:
    if group.sinks:
        return False
    for m in group.members:
        if m.role != "in":
            continue
        module = model.get_submodule(m.module)
        if isinstance(module, nn.Linear):
            continue
        if isinstance(module, nn.modules.conv._ConvNd) and module.groups == 1 and not module.transposed and all(
                p == 0 for p in module.padding):
            continue
        return False
    return True


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give norms and biases non-trivial values (torchvision initialises β and biases to 0, which
    would hide folding bugs). Returns the model."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            for name, t in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
                if not t.is_floating_point():
                    continue
                if name == "bias":
                    t.copy_(torch.randn(t.shape, generator=g, dtype=t.dtype) * 0.2)
                elif name == "running_mean":
                    t.copy_(torch.randn(t.shape, generator=g, dtype=t.dtype) * 0.1)
                elif name == "running_var" or (name == "weight" and t.ndim == 1):
                    t.copy_(0.5 + torch.rand(t.shape, generator=g, dtype=t.dtype))
    return model
