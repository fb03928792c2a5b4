"""One GEMM for q, k and v: a deployed :class:`~sparsify.nn.ExplicitMultiheadAttention` called as self-attention
(query, key and value the same tensor, as in ViT) projects all three with one ``nn.Linear``.

The explicit module (swapped in so that heads can be pruned) runs three projection GEMMs where
``nn.MultiheadAttention`` runs one; at small batches every kernel counts (ViT-B/16 on an H200, batch 1: a
heads-pruned network was slower than dense). :class:`FusedSelfAttention` keeps the (pruned) widths and the
outputs, concatenating the three weights; called with a distinct key or value it projects each with its own
slice of the fused weight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sparsify.errors import SparsifyError
from sparsify.nn.attention import ExplicitMultiheadAttention, ProjectedAttention

__all__ = ["FusedSelfAttention", "fuse_attention_projections_"]


class FusedSelfAttention(ProjectedAttention):
    """An :class:`ExplicitMultiheadAttention` whose q/k/v projections are one ``nn.Linear`` (``qkv_proj``,
    rows q then k then v, ``sizes`` their widths); same call signature and outputs."""

    def __init__(self, mha: ExplicitMultiheadAttention) -> None:
        super().__init__()
        projections = (mha.q_proj, mha.k_proj, mha.v_proj)
        if not fusable(mha):
            raise SparsifyError("q/k/v projections of different input widths or bias presence cannot share one GEMM; "
                                "leave this module unfused (fuse_attention_projections_ skips it)")
        weight = torch.cat([p.weight.detach() for p in projections])
        self.sizes = tuple(p.out_features for p in projections)
        self.qkv_proj = nn.Linear(weight.shape[1], weight.shape[0], bias=mha.q_proj.bias is not None,
                                  device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            self.qkv_proj.weight.copy_(weight)
            if self.qkv_proj.bias is not None:
                self.qkv_proj.bias.copy_(torch.cat([p.bias.detach() for p in projections]))
        self.out_proj = mha.out_proj
        self.embed_dim, self.num_heads, self.head_dim = mha.embed_dim, mha.num_heads, mha.head_dim
        self.dropout, self.batch_first = mha.dropout, mha.batch_first
        self.train(mha.training)

    def project(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, same: bool
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if same:
            q, k, v = self.qkv_proj(query).split(self.sizes, dim=-1)
            return q, k, v
        weights = self.qkv_proj.weight.split(self.sizes)
        biases = self.qkv_proj.bias.split(self.sizes) if self.qkv_proj.bias is not None else (None,) * 3
        q, k, v = (F.linear(t, w, b) for t, w, b in zip((query, key, value), weights, biases, strict=True))
        return q, k, v


def fusable(mha: ExplicitMultiheadAttention) -> bool:
    """Whether the three projections read the same width and all have (or all lack) a bias."""
    projections = (mha.q_proj, mha.k_proj, mha.v_proj)
    return (len({p.in_features for p in projections}) == 1
            and len({p.bias is not None for p in projections}) == 1)


def fuse_attention_projections_(model: nn.Module) -> list[str]:
    """Replace (in place) every :class:`ExplicitMultiheadAttention` of ``model`` whose projections can share a
    GEMM by a :class:`FusedSelfAttention`; returns the module paths replaced."""
    replaced = []
    for path, module in list(model.named_modules()):
        for name, child in list(module.named_children()):
            if type(child) is ExplicitMultiheadAttention and fusable(child):
                setattr(module, name, FusedSelfAttention(child))
                replaced.append(f"{path}.{name}" if path else name)
    return replaced
