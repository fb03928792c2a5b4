"""``nn.MultiheadAttention`` rewritten so that torch.fx traces into it and its heads are prunable."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sparsify.errors import SparsifyError
from sparsify.graph.module_types import register_module_type

__all__ = ["ExplicitMultiheadAttention", "ProjectedAttention", "explicit_multihead_attention_", "scaled_attention"]


class ProjectedAttention(nn.Module):
    """``nn.MultiheadAttention``'s call (signature, ``batch_first``, masks, output projection) around the q/k/v
    projections a subclass gives in :meth:`project`; the attention weights are not returned (None)."""

    head_dim: int
    dropout: float
    batch_first: bool
    out_proj: nn.Linear

    def project(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, same: bool
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v of ``(batch, tokens, features)`` inputs; ``same``: query, key and value are one tensor."""
        raise NotImplementedError

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, None]:
        same = query is key and key is value
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        q, k, v = self.project(query, key, value, same)
        y = scaled_attention(q, k, v, self.head_dim, key_padding_mask=key_padding_mask, attn_mask=attn_mask,
                             is_causal=is_causal, dropout=self.dropout if self.training else 0.0)
        y = self.out_proj(y)
        return (y if self.batch_first else y.transpose(0, 1)), None


class ExplicitMultiheadAttention(ProjectedAttention):
    """What ``nn.MultiheadAttention`` computes, written with nn.Linear q/k/v/out projections,
    ``view(b, s, -1, head_dim)`` and ``F.scaled_dot_product_attention``, so that torch.fx traces
    into it and its heads are prunable (``nn.MultiheadAttention`` is a leaf whose inner width must
    equal ``embed_dim``). Made by :func:`explicit_multihead_attention_`; same call signature, but the
    attention weights are not returned (the second output is None)."""

    def __init__(self, mha: nn.MultiheadAttention) -> None:
        super().__init__()
        if not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn:
            raise SparsifyError("only nn.MultiheadAttention with kdim == vdim == embed_dim, no add_bias_kv and no "
                                "add_zero_attn can be swapped for an explicit attention module")
        e, factory = mha.embed_dim, {"device": mha.in_proj_weight.device, "dtype": mha.in_proj_weight.dtype}
        bias = mha.in_proj_bias is not None
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(e, e, bias=bias, **factory) for _ in range(3))
        self.out_proj = nn.Linear(e, e, bias=mha.out_proj.bias is not None, **factory)
        with torch.no_grad():
            for i, proj in enumerate((self.q_proj, self.k_proj, self.v_proj)):
                proj.weight.copy_(mha.in_proj_weight[i * e:(i + 1) * e])
                if bias:
                    proj.bias.copy_(mha.in_proj_bias[i * e:(i + 1) * e])
            self.out_proj.weight.copy_(mha.out_proj.weight)
            if mha.out_proj.bias is not None:
                self.out_proj.bias.copy_(mha.out_proj.bias)
        self.embed_dim, self.num_heads, self.head_dim = e, mha.num_heads, mha.head_dim
        self.dropout, self.batch_first = mha.dropout, mha.batch_first
        self.train(mha.training)

    def project(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, same: bool
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.q_proj(query), self.k_proj(key), self.v_proj(value)


def scaled_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, head_dim: int, *,
                     key_padding_mask: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None,
                     is_causal: bool = False, dropout: float = 0.0) -> torch.Tensor:
    """``nn.MultiheadAttention``'s attention of projected ``(batch, tokens, heads * head_dim)`` q/k/v, with its
    masks (boolean or additive), through ``F.scaled_dot_product_attention``; returns ``(batch, tokens, heads *
    head_dim)`` before the output projection."""
    b, n, s = q.shape[0], q.shape[1], k.shape[1]
    q = q.view(b, n, -1, head_dim).transpose(1, 2)
    k = k.view(b, s, -1, head_dim).transpose(1, 2)
    v = v.view(b, s, -1, head_dim).transpose(1, 2)
    mask = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
                             target_type=q.dtype, check_other=False)
    if key_padding_mask is not None:
        padding = F._canonical_mask(mask=key_padding_mask, mask_name="key_padding_mask", other_type=None,
                                    other_name="", target_type=q.dtype, check_other=False).view(b, 1, 1, s)
        mask = padding if mask is None else mask + padding
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=is_causal and mask is None)
    return y.transpose(1, 2).reshape(b, n, -1)


def _explicit_mha(m: ExplicitMultiheadAttention, old: dict) -> None:
    m.num_heads = m.q_proj.out_features // m.head_dim


register_module_type(ExplicitMultiheadAttention, sync=_explicit_mha)


def explicit_multihead_attention_(model: nn.Module) -> nn.Module:
    """Replace every ``nn.MultiheadAttention`` in ``model`` (in place) by an equivalent
    :class:`ExplicitMultiheadAttention`, whose heads the ``heads`` adapter can prune. Returns ``model``."""
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is nn.MultiheadAttention:
                setattr(module, child_name, ExplicitMultiheadAttention(child))
    return model
