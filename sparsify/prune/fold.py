"""Fold the constants that removed channels still emit into the next layer's bias.

A channel whose producing weights are zero can still carry a constant (a BatchNorm with γ = 0
emits β, then the activation of β). Removing it is exact only if every consumer absorbs that
constant: a Linear or a convolution without padding adds W[:, c]·k to its bias. A padded
convolution sees the constant only inside the image, so folding there is approximate.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sparsify.graph.channel_graph import ChannelGraph, Member
from sparsify.prune.capture import capture_channels


@dataclass
class BiasFold:
    """Add ``delta`` to ``module``'s bias (creating the bias if it has none)."""

    module: str
    delta: torch.Tensor
    exact: bool
    note: str


def plan_folds(cg: ChannelGraph, removals: list[tuple[Member, torch.Tensor]], atol: float) -> list[BiasFold]:
    """Measure the removed channels at every consumer and plan bias folds for the constant ones.

    ``removals`` lists (consumer member, removed indices). Channels that vary with the input are
    not constants: removing them is the caller's decision (one-shot pruning) and nothing is folded.
    """
    if not removals:
        return []
    values = capture_channels(cg.traced, [(m.space, idx) for m, idx in removals])
    model = cg.model
    deltas: dict[str, BiasFold] = {}
    for (member, idx), v in zip(removals, values, strict=True):
        if v.numel() == 0:
            continue
        const = v[:, :1]
        scale = v.abs().amax(dim=1, keepdim=True).clamp_min(1.0)
        is_const = ((v - const).abs() <= atol * scale).all(dim=1)
        k = torch.where(is_const & (const.abs().squeeze(1) > atol), const.squeeze(1), torch.zeros_like(const.squeeze(1)))
        if not bool((k != 0).any()):
            continue
        module = model.get_submodule(member.module)
        fold = _fold_into(module, member, idx, k)
        if fold is None:
            fold = BiasFold(member.module, torch.empty(0), False,
                            f"{member.tensor}: removed channels carry constants {k[k != 0][:4].tolist()} "
                            "that this consumer cannot absorb")
        if member.module in deltas and fold.delta.numel():
            prev = deltas[member.module]
            deltas[member.module] = BiasFold(member.module, prev.delta + fold.delta, prev.exact and fold.exact,
                                             prev.note or fold.note)
        else:
            deltas.setdefault(member.module, fold)
    return list(deltas.values())


def _fold_into(module: nn.Module, member: Member, idx: torch.Tensor, k: torch.Tensor) -> BiasFold | None:
    expected = f"{member.module}.weight" if member.module else "weight"
    if member.tensor != expected:
        return None
    w = module.weight.detach()
    idx = idx.to(w.device)
    k = k.to(w.device, w.dtype)
    if isinstance(module, nn.Linear) and member.dim == 1:
        return BiasFold(member.module, w.index_select(1, idx) @ k, True, "")
    if isinstance(module, nn.modules.conv._ConvNd) and not module.transposed and module.groups == 1 and member.dim == 1:
        cols = w.index_select(1, idx)
        delta = torch.einsum("oc...,c->o", cols, k)
        padded = any(p != 0 for p in module.padding) if isinstance(module.padding, tuple) else module.padding != "valid"
        note = "" if not padded else (f"'{member.module}' pads its input, so the folded constant is "
                                      "exact only away from the border")
        return BiasFold(member.module, delta, not padded, note)
    return None


def apply_fold(model: nn.Module, fold: BiasFold) -> None:
    module = model.get_submodule(fold.module)
    if module.bias is None:
        module.bias = nn.Parameter(fold.delta.clone(), requires_grad=module.weight.requires_grad)
    else:
        module.bias.data = module.bias.data + fold.delta
