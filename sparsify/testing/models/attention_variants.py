"""Hand-written attention variants from issue #21's silent-wrong class: partial rotary embeddings, q|k|v
interleaved per head, head layouts that differ by layer, q and k from one shared projection, sliding-window
and full layers alternating, parallel attention + MLP blocks, grouped key/value heads repeated by
``repeat_interleave`` or ``expand``, a per-head bias added after the head split. Each block sits in a small
pre-norm stack (linear embedding, LayerNorm, GELU MLP, linear head) on B×T×5 tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sparsify.testing.models.common import Example

DIM = 8


@dataclass(frozen=True)
class Layout:
    """How one attention layer is written. ``kv_heads`` < ``heads``: grouped keys/values, repeated by
    ``repeat`` ("interleave" or "expand"); ``rotary``: rotate the first ``rotary`` dims of each head."""

    heads: int = 2
    head_dim: int = 4
    kv_heads: int | None = None
    repeat: str = "interleave"
    rotary: int = 0
    interleaved_qkv: bool = False
    shared_qk: bool = False
    head_bias: bool = False
    window: int = 0


def rotate(t: torch.Tensor, dims: int) -> torch.Tensor:
    """Rotary embedding (rotate-half form) on the first ``dims`` of the last dim; the rest passes through."""
    half = dims // 2
    pos = torch.arange(t.shape[-2], dtype=t.dtype, device=t.device)[:, None]
    angle = pos * torch.arange(1, half + 1, dtype=t.dtype, device=t.device)[None] * 0.1
    cos, sin = torch.cat([angle.cos()] * 2, -1), torch.cat([angle.sin()] * 2, -1)
    r, rest = t[..., :dims], t[..., dims:]
    turned = torch.cat([-r[..., half:], r[..., :half]], -1)
    return torch.cat([r * cos + turned * sin, rest], -1)


class VariantAttention(nn.Module):
    """Self-attention written out per :class:`Layout`; SDPA, heads merged, output projection."""

    def __init__(self, layout: Layout) -> None:
        super().__init__()
        self.layout = lay = layout
        kv = lay.kv_heads or lay.heads
        if lay.interleaved_qkv:
            self.qkv = nn.Linear(DIM, 3 * lay.heads * lay.head_dim)
        else:
            self.q = nn.Linear(DIM, lay.heads * lay.head_dim, bias=not lay.head_bias)
            self.k = self.q if lay.shared_qk else nn.Linear(DIM, kv * lay.head_dim)
            self.v = nn.Linear(DIM, kv * lay.head_dim)
        if lay.head_bias:
            self.q_bias = nn.Parameter(torch.randn(lay.heads, lay.head_dim))
        self.o = nn.Linear(lay.heads * lay.head_dim, DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lay, (b, n, _) = self.layout, x.shape
        if lay.interleaved_qkv:  # GPT-NeoX / BLOOM: (head, q|k|v, head_dim)
            q, k, v = (t.transpose(1, 2) for t in self.qkv(x).view(b, n, -1, 3, lay.head_dim).unbind(3))
        else:
            q = self.q(x).view(b, n, -1, lay.head_dim)
            if lay.head_bias:
                q = q + self.q_bias
            q, k, v = (t.transpose(1, 2) for t in (q, self._heads(self.k(x)), self._heads(self.v(x))))
        if lay.rotary:
            q, k = rotate(q, lay.rotary), rotate(k, lay.rotary)
        if lay.kv_heads and lay.kv_heads != lay.heads:
            k, v = self._repeat(k), self._repeat(v)
        mask = None
        if lay.window:
            i = torch.arange(n, device=x.device)
            mask = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < lay.window)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o(y.transpose(1, 2).reshape(b, n, -1))

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        return t.view(t.shape[0], t.shape[1], -1, self.layout.head_dim)

    def _repeat(self, t: torch.Tensor) -> torch.Tensor:
        lay = self.layout
        r = lay.heads // (lay.kv_heads or lay.heads)
        if lay.repeat == "interleave":
            return t.repeat_interleave(r, dim=1)
        b, kv, n, d = t.shape
        return t[:, :, None].expand(b, kv, r, n, d).reshape(b, kv * r, n, d)


class AttentionStack(nn.Module):
    """Linear embedding → pre-norm blocks (one :class:`VariantAttention` per layout, each with a GELU MLP;
    ``parallel``: ``x + attn(ln(x)) + mlp(ln(x))`` as in GPT-J / Falcon) → linear head.

    Rules: linear, layout (head split and merge), scaled_dot_product_attention, layer_norm, split,
    repeat_interleave / expand, getitem slices and cat (rotary). Heads are an exact group where the layout
    allows it; the others are refused with a reason (see tests/graph/rules/test_silent_wrong_class.py)."""

    def __init__(self, layouts: tuple[Layout, ...], parallel: bool = False) -> None:
        super().__init__()
        self.parallel = parallel
        self.embed, self.head = nn.Linear(5, DIM), nn.Linear(DIM, 3)
        self.attn = nn.ModuleList(VariantAttention(lay) for lay in layouts)
        self.norms = nn.ModuleList(nn.LayerNorm(DIM) for _ in layouts)
        self.mlps = nn.ModuleList(nn.Sequential(nn.Linear(DIM, 12), nn.GELU(), nn.Linear(12, DIM)) for _ in layouts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for attn, norm, mlp in zip(self.attn, self.norms, self.mlps, strict=True):
            if self.parallel:
                h = norm(x)
                x = x + attn(h) + mlp(h)
            else:
                x = x + attn(norm(x))
                x = x + mlp(x)
        return self.head(x)


#: name → (layouts, parallel)
STACKS: dict[str, tuple[tuple[Layout, ...], bool]] = {
    "partial_rotary": ((Layout(rotary=2), Layout(rotary=2)), False),
    "interleaved_qkv": ((Layout(interleaved_qkv=True),), False),
    "per_layer_heads": ((Layout(heads=2, head_dim=4), Layout(heads=4, head_dim=2)), False),
    "shared_qk": ((Layout(shared_qk=True),), False),
    "sliding_then_full": ((Layout(window=2), Layout()), False),
    "parallel_blocks": ((Layout(), Layout()), True),
    "gqa_repeat_interleave": ((Layout(heads=4, head_dim=2, kv_heads=2),), False),
    "gqa_expand": ((Layout(heads=4, head_dim=2, kv_heads=2, repeat="expand"),), False),
    "head_bias_after_split": ((Layout(head_bias=True),), False),
}


def attention_stack(name: str, dtype: torch.dtype = torch.float32) -> Example:
    """The :data:`STACKS` model ``name`` and a (2, 6, 5) token batch."""
    layouts, parallel = STACKS[name]
    torch.manual_seed(0)
    return AttentionStack(layouts, parallel).to(dtype), torch.randn(2, 6, 5, dtype=dtype)
