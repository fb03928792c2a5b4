"""Models on token sequences: an embedding MLP, transformer MLP and attention blocks, a tied language-model
head, a fused q|k|v projection split by slicing."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sparsify.testing.models.common import Example


# ----- text ---------------------------------------------------------------------------------------
class TextMLP(nn.Module):
    """nn.Embedding → Linear → ReLU → Linear on int64 token ids (B×T).

    Rules: embedding (weight dim 1 is the embedding dim, role ``value``), linear on 3-d inputs,
    elementwise. Prunable groups (2): the embedding dim and the hidden layer.
    """

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 12)
        self.fc1 = nn.Linear(12, 16)
        self.fc2 = nn.Linear(16, 5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(self.embed(ids))))


def text_mlp(dtype: torch.dtype = torch.float32) -> Example:
    return TextMLP().to(dtype), torch.randint(0, 20, (2, 7))


# ----- transformer MLP block ----------------------------------------------------------------------
class MLPBlock(nn.Module):
    """Pre-norm transformer MLP: x + fc2(GELU(fc1(LayerNorm(x)))), then a final LayerNorm and a
    linear head, on B×T×C tokens embedded by a linear layer.

    Rules: layer_norm (inexact on the normalised dim), linear, elementwise (GELU, add). The hidden
    group (``mlp.0``) is prunable and exact; the residual stream (``embed``, ``mlp.2``, both norms)
    is prunable but not exact.
    """

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 16)
        self.norm1 = nn.LayerNorm(16)
        self.mlp = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
        self.norm2 = nn.LayerNorm(16)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        x = x + self.mlp(self.norm1(x))
        return self.head(self.norm2(x))


def mlp_block(dtype: torch.dtype = torch.float32) -> Example:
    return MLPBlock().to(dtype), torch.randn(2, 5, 6, dtype=dtype)


# ----- hand-written attention ---------------------------------------------------------------------
class Attention(nn.Module):
    """Multi-head self-attention written by hand: qkv linear, chunk into q/k/v, view into heads,
    transpose, F.scaled_dot_product_attention, transpose back, reshape, output projection."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q, k, v = (t.view(b, n, self.heads, c // self.heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(b, n, c))


class TransformerBlock(nn.Module):
    """A pre-norm transformer block (hand-written attention + GELU MLP) between a linear embedding
    and a linear head, on B×T×C tokens.

    Rules: split (chunk), layout (view into heads: a barrier for now), scaled_dot_product_attention,
    layer_norm, linear. The qkv output (and so the projection's input) is a barrier; the MLP hidden
    group stays prunable and exact; the residual stream is a barrier (the attention reads its width c from
    the block input's shape into its views).
    """

    def __init__(self, dim: int = 12, heads: int = 3) -> None:
        super().__init__()
        self.embed = nn.Linear(5, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 20), nn.GELU(), nn.Linear(20, dim))
        self.head = nn.Linear(dim, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        x = x + self.attn(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return self.head(x.mean(1))


def transformer_block(dtype: torch.dtype = torch.float32) -> Example:
    return TransformerBlock().to(dtype), torch.randn(2, 7, 5, dtype=dtype)


# ----- tied embedding (regression) ----------------------------------------------------------------
class TiedLM(nn.Module):
    """A language-model head tied to the embedding (``head.weight = embed.weight``, one Parameter
    under two names; ``alias=False`` leaves ``head`` untied) plus a functional readout through the
    same tensor (F.linear(h, embed.weight)).

    Rules: embedding (weight dim 1 produces the embedding dim), linear, linear_functional.
    Topology: the tied tensor's dim 1 makes the embedding channels and consumes the hidden
    channels, so ``embed`` and ``fc`` are one group and the tensor is sliced once.
    """

    def __init__(self, alias: bool = True) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 8)
        self.fc = nn.Linear(8, 8)
        self.head = nn.Linear(8, 11, bias=False)
        if alias:
            self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.fc(self.embed(ids)))
        return self.head(h) + F.linear(h, self.embed.weight)


def tied_lm(dtype: torch.dtype = torch.float32, alias: bool = True) -> Example:
    return TiedLM(alias).to(dtype), torch.randint(0, 11, (2, 5))


# ----- fused q|k|v projection split by slicing (issue #21) ----------------------------------------
class FusedQKVSliceNet(nn.Module):
    """One linear makes q|k|v; each is sliced out (``qkv[..., :16]``), viewed into heads and
    transposed, as in Phi-3. Each view splits only the channels its slice keeps, so the layout rule
    must couple just those (the others are not in that output). Not in ``MODELS``: the head split of
    a slice is refused (a barrier), so the projection is not prunable; the model checks that this is
    decided the same way every time."""

    def __init__(self, width: int = 16, head_dim: int = 4) -> None:
        super().__init__()
        self.width, self.head_dim = width, head_dim
        self.qkv = nn.Linear(width, 3 * width)
        self.o = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, w = x.shape[0], x.shape[1], self.width
        qkv = self.qkv(x)
        q, k, v = (qkv[..., i * w:(i + 1) * w].view(b, s, -1, self.head_dim).transpose(1, 2) for i in range(3))
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, s, w)
        return self.o(out)


def fused_qkv_slice_net(dtype: torch.dtype = torch.float32) -> Example:
    torch.manual_seed(0)
    return FusedQKVSliceNet().to(dtype), torch.randn(2, 5, 16, dtype=dtype)
