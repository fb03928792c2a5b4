"""Small sequence models for the op rules that ``sparsify.testing.models`` does not exercise: attention
heads (hand-written, eager and ``nn.MultiheadAttention``), RNN layers, RNN cells in a loop, packed sequences.

Builders return ``(model, example_inputs)`` in the requested dtype; ``sparsify.testing.rule_models`` re-exports them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

Example = tuple[nn.Module, Any]


# ----- attention -----------------------------------------------------------------------------------
class HeadsAttention(nn.Module):
    """Self-attention written out: q/k/v/o linears, view into heads (``view(b, s, -1, head_dim)``: the head
    count follows the width) + transpose,
    F.scaled_dot_product_attention (``eager=False``) or matmul → softmax → matmul, merge, then a GELU MLP.

    Rules: linear, layout, scaled_dot_product_attention (or matmul, softmax). Adapter: heads."""

    def __init__(self, dim: int = 8, heads: int = 2, head_dim: int = 4, eager: bool = False) -> None:
        super().__init__()
        self.heads, self.head_dim, self.eager = heads, head_dim, eager
        self.q, self.k, self.v = (nn.Linear(dim, heads * head_dim) for _ in range(3))
        self.o = nn.Linear(heads * head_dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, 12), nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = (p(x).view(b, s, -1, self.head_dim).transpose(1, 2) for p in (self.q, self.k, self.v))
        if self.eager:
            y = torch.softmax(q @ k.transpose(-1, -2) * self.head_dim ** -0.5, dim=-1) @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v)
        h = x + self.o(y.transpose(1, 2).reshape(b, s, -1))
        return self.fc2(F.gelu(self.fc1(h))).mean(1)


def heads_attention(dtype: torch.dtype = torch.float32, eager: bool = False) -> Example:
    return HeadsAttention(eager=eager).to(dtype), torch.randn(2, 5, 8, dtype=dtype)


def eager_attention(dtype: torch.dtype = torch.float32) -> Example:
    """:class:`HeadsAttention` with matmul → softmax → matmul."""
    return heads_attention(dtype, eager=True)


class MHABlock(nn.Module):
    """nn.MultiheadAttention (a barrier) between two linears, then an MLP head.

    Rules: attention_barrier, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.fc1, self.fc2 = nn.Linear(8, 10), nn.Linear(10, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        h = h + self.attn(h, h, h, need_weights=False)[0]
        return self.fc2(F.relu(self.fc1(h))).mean(1)


def mha_block(dtype: torch.dtype = torch.float32) -> Example:
    return MHABlock().to(dtype), torch.randn(2, 5, 4, dtype=dtype)


# ----- recurrent -----------------------------------------------------------------------------------
class Recurrent(nn.Module):
    """Linear → ``cls`` (nn.LSTM, nn.GRU or nn.RNN; batch first) → Linear on every step.

    Rules: lstm / gru / rnn (rnn_aten under export). Adapter: rnn_units."""

    def __init__(self, cls: type[nn.RNNBase] = nn.LSTM) -> None:
        super().__init__()
        self.pre = nn.Linear(5, 7)
        self.rnn = cls(7, 6, batch_first=True)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.pre(x))
        return self.fc(out)


def lstm_net(dtype: torch.dtype = torch.float32, cls: type[nn.RNNBase] = nn.LSTM) -> Example:
    return Recurrent(cls).to(dtype), torch.randn(2, 4, 5, dtype=dtype)


def gru_net(dtype: torch.dtype = torch.float32) -> Example:
    return lstm_net(dtype, nn.GRU)


def rnn_net(dtype: torch.dtype = torch.float32) -> Example:
    return lstm_net(dtype, nn.RNN)


class CellLoop(nn.Module):
    """``cls`` (nn.GRUCell, nn.LSTMCell or nn.RNNCell) over 3 time steps (no state first), the hidden
    states stacked, plus ``zeros_like``.

    Rules: gru_cell / lstm_cell / rnn_cell (rnn_cell_aten under export), stack, zeros."""

    def __init__(self, cls: type[nn.RNNCellBase] = nn.GRUCell) -> None:
        super().__init__()
        self.pre = nn.Linear(5, 7)
        self.cell = cls(7, 6)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, state, outs = self.pre(x), None, []
        for t in range(3):
            state = self.cell(x[:, t], state)
            h = state[0] if isinstance(self.cell, nn.LSTMCell) else state  # (h, c) or h
            outs.append(h + torch.zeros_like(h))
        return self.fc(torch.stack(outs, 1))


def cell_loop(dtype: torch.dtype = torch.float32, cls: type[nn.RNNCellBase] = nn.GRUCell) -> Example:
    return CellLoop(cls).to(dtype), torch.randn(2, 3, 5, dtype=dtype)


def lstm_cell_loop(dtype: torch.dtype = torch.float32) -> Example:
    return cell_loop(dtype, nn.LSTMCell)


def rnn_cell_loop(dtype: torch.dtype = torch.float32) -> Example:
    return cell_loop(dtype, nn.RNNCell)


class PackedLSTM(nn.Module):
    """Padded batch → pack_padded_sequence (unsorted lengths) → nn.LSTM → pad_packed_sequence → Linear.

    Rules: pack_padded_sequence, pad_packed_sequence, rnn."""

    def __init__(self) -> None:
        super().__init__()
        self.pre = nn.Linear(5, 7)
        self.rnn = nn.LSTM(7, 6, batch_first=True)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(pack_padded_sequence(self.pre(x), lengths, batch_first=True, enforce_sorted=False))
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
        return self.fc(out)


def packed_lstm(dtype: torch.dtype = torch.float32) -> Example:
    return PackedLSTM().to(dtype), (torch.randn(3, 4, 5, dtype=dtype), torch.tensor([2, 4, 3]))


MODELS: dict[str, Callable[..., Example]] = {
    "heads_attention": heads_attention,
    "eager_attention": eager_attention,
    "mha_block": mha_block,
    "lstm_net": lstm_net,
    "gru_net": gru_net,
    "rnn_net": rnn_net,
    "cell_loop": cell_loop,
    "lstm_cell_loop": lstm_cell_loop,
    "rnn_cell_loop": rnn_cell_loop,
    "packed_lstm": packed_lstm,
}
