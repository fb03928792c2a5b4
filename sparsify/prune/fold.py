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

from sparsify._utils import owner_of
from sparsify.graph.builder import Space
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
    sites = [_call_sites(cg, m) for m, _ in removals]
    values = iter(capture_channels(cg.traced, [(s, idx) for (_, idx), ss in zip(removals, sites, strict=True)
                                               for s in ss]))
    model = cg.model
    deltas: dict[str, BiasFold] = {}
    for (member, idx), ss in zip(removals, sites, strict=True):
        vs = [next(values) for _ in ss]
        ks = [_constants(v, atol) for v in vs]
        k = ks[0]
        if any(bool(_zero_padded_constants(v, atol).any()) for v in vs):
            fold = BiasFold(member.module, torch.empty(0), False,
                            f"removed input channels of '{member.module}' carry a constant that was zero-padded "
                            "on the way (a pad between them and the layer): no bias reproduces its border")
        elif any(not torch.allclose(k, other, rtol=0.0, atol=atol) for other in ks[1:]):
            fold = BiasFold(member.module, torch.empty(0), False,
                            f"'{member.module}' is called at {len(ss)} places whose removed input channels carry "
                            "different constants; one bias cannot absorb them")
        elif not bool((k != 0).any()):
            continue
        else:
            fold = _fold_into(model, member, idx, k) or BiasFold(
                member.module, torch.empty(0), False,
                f"{member.tensor}: removed channels carry constants {k[k != 0][:4].tolist()} "
                "that this consumer cannot absorb")
        prev = deltas.get(member.module)
        if prev is not None:
            delta = prev.delta + fold.delta if prev.delta.numel() and fold.delta.numel() else (
                prev.delta if prev.delta.numel() else fold.delta)
            fold = BiasFold(member.module, delta, prev.exact and fold.exact, prev.note or fold.note)
        deltas[member.module] = fold
    return list(deltas.values())


def check_sinks(cg: ChannelGraph, sinks: list[tuple[Space, torch.Tensor, str]], atol: float) -> list[BiasFold]:
    """Removed channels that reach a parameter-free mixing op (a sum over channels, an activation
    product) must be exactly zero there: report those that carry a constant as inexact."""
    if not sinks:
        return []
    values = capture_channels(cg.traced, [(space, idx) for space, idx, _ in sinks])
    out = []
    for (_, _, why), v in zip(sinks, values, strict=True):
        k = v.abs().amax(dim=1) if v.numel() else v.new_zeros(0)
        if bool((k > atol).any()):
            out.append(BiasFold("", torch.empty(0), False,
                                f"removed channels reach {why} with non-zero values (up to {float(k.max()):.3g})"))
    return out


def _constants(v: torch.Tensor, atol: float) -> torch.Tensor:
    """Per channel (row of ``v``), its value if it is the same non-zero constant everywhere, else 0.

    ``atol`` decides only whether a channel is constant; a constant is folded however small it is (a
    constant below ``atol`` dropped unfolded made removal silently inexact: HF Apertus' xIELU)."""
    if v.numel() == 0:
        return torch.zeros(v.shape[0], dtype=v.dtype, device=v.device)
    const = v[:, 0]
    scale = v.abs().amax(dim=1).clamp_min(1.0)
    is_const = ((v - const[:, None]).abs() <= atol * scale[:, None]).all(dim=1)
    return torch.where(is_const & (const != 0), const, torch.zeros_like(const))


def _zero_padded_constants(v: torch.Tensor, atol: float) -> torch.Tensor:
    """Per channel: True if it is one non-zero constant except at positions where it is exactly zero (a
    constant that went through a zero pad): folding it into a bias would add it at the border too."""
    if v.numel() == 0:
        return torch.zeros(v.shape[0], dtype=torch.bool, device=v.device)
    zero = v == 0
    live = ~zero
    first = torch.where(live, v, torch.zeros_like(v)).sum(dim=1) / live.sum(dim=1).clamp_min(1)
    scale = v.abs().amax(dim=1).clamp_min(1.0)
    same = ((v - first[:, None]).abs() <= atol * scale[:, None]) | zero
    return same.all(dim=1) & zero.any(dim=1) & live.any(dim=1) & (first.abs() > atol * scale)


def _call_sites(cg: ChannelGraph, member: Member) -> list[Space]:
    """Every channel space a consumer member reads: one per call of a module that is called twice."""
    spaces = [m.space for m in cg.facts.members if (m.tensor, m.dim, m.role) == (member.tensor, member.dim, "in")]
    return list(dict.fromkeys([member.space, *spaces]))


def _fold_into(model: nn.Module, member: Member, idx: torch.Tensor, k: torch.Tensor) -> BiasFold | None:
    module = model.get_submodule(member.module)
    owner, attr = owner_of(model, member.tensor)
    tied = getattr(owner, attr, None) is getattr(module, "weight", False)
    if member.tensor != (f"{member.module}.weight" if member.module else "weight") and not tied:
        return None  # not this module's weight (``tied``: its weight, registered first under another name)
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
