"""Models whose one tensor serves several roles (issue #21's silent-wrong class): a fused projection cut by
``chunk`` or by sizes into roles, one module called at two places, a bias added after a reshape, and a gate
whose removed channels are a non-zero constant multiplying a broadcast sum."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sparsify.testing.models.common import Example, image


class FusedGateUpMLP(nn.Module):
    """Phi-3's MLP: one linear makes gate|up, ``chunk(2)`` cuts it, ``down(silu(gate) * up)`` on a residual.

    Rules: split (chunk), elementwise (mul couples gate and up channel by channel), linear. The fused
    projection's two halves are one group of 12 (gate channel i with up channel i), exact."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.gate_up = nn.Linear(6, 8), nn.Linear(8, 2 * 12)
        self.down, self.head = nn.Linear(12, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        gate, up = self.gate_up(h).chunk(2, dim=-1)
        return self.head(h + self.down(F.silu(gate) * up))


def fused_gate_up_mlp(dtype: torch.dtype = torch.float32) -> Example:
    return FusedGateUpMLP().to(dtype), torch.randn(2, 4, 6, dtype=dtype)


class SplitBySizeRoles(nn.Module):
    """One linear cut by ``split([10, 6])`` into two roles (a ReLU branch and a tanh branch).

    Rules: split with hard-coded unequal sizes: a barrier on the fused output (the sizes do not follow
    pruning); the input layer stays prunable and exact."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.fused = nn.Linear(6, 8), nn.Linear(8, 16)
        self.a, self.b = nn.Linear(10, 3), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u, v = self.fused(F.relu(self.embed(x))).split([10, 6], dim=-1)
        return self.a(F.relu(u)) + self.b(torch.tanh(v))


def split_by_size_roles(dtype: torch.dtype = torch.float32) -> Example:
    return SplitBySizeRoles().to(dtype), torch.randn(2, 4, 6, dtype=dtype)


class ModulationChunk(nn.Module):
    """adaLN / FiLM: one linear makes scale|shift (``chunk(2)``), applied as ``h * (1 + scale) + shift``.

    Rules: split (chunk), elementwise with a scalar (``1 + scale``: a removed channel holds 1, and is zero
    again after the product with the removed ``h``), linear. Scale, shift and ``h`` are one exact group."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.mod, self.out = nn.Linear(5, 8), nn.Linear(5, 16), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale, shift = self.mod(x).chunk(2, dim=-1)
        return self.out(F.relu(self.a(x)) * (1 + scale) + shift)


def modulation_chunk(dtype: torch.dtype = torch.float32) -> Example:
    return ModulationChunk().to(dtype), torch.randn(2, 6, 5, dtype=dtype)


class SharedAcrossRoles(nn.Module):
    """One linear called at two places, on two branches that end in different activations and heads.

    Topology: the shared module's input channels tie both branches' producers into one group; its output
    channels are one group read by two heads. Both exact (zeroed biases); with the biases kept the two
    call sites carry different constants and the removal is refused (``InexactPruneError``)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.shared = nn.Linear(5, 8), nn.Linear(5, 8), nn.Linear(8, 6)
        self.h1, self.h2 = nn.Linear(6, 3), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        one = self.h1(F.relu(self.shared(F.relu(self.a(x)))))
        return one + self.h2(torch.sigmoid(self.shared(torch.tanh(self.b(x)))))


def shared_across_roles(dtype: torch.dtype = torch.float32) -> Example:
    return SharedAcrossRoles().to(dtype), torch.randn(2, 6, 5, dtype=dtype)


class BiasAfterReshape(nn.Module):
    """A bias-free conv whose output is viewed as 2×4 channels, gets a (2, 4) bias, and is viewed back.

    Rules: layout (view split and merge of the channel dim), elementwise add of a parameter broadcast over
    batch and space. The bias is not sliced with the conv (a barrier through the split), so the conv is not
    prunable; the next conv's output stays exact."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.fc = nn.Conv2d(3, 8, 1, bias=False), nn.Conv2d(8, 4, 1), nn.Linear(4, 3)
        self.bias = nn.Parameter(torch.randn(2, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        b, c, hh, ww = h.shape
        h = (h.view(b, 2, 4, hh, ww) + self.bias[None, :, :, None, None]).view(b, c, hh, ww)
        return self.fc(self.b(F.relu(h)).mean((2, 3)))


def bias_after_reshape(dtype: torch.dtype = torch.float32) -> Example:
    return BiasAfterReshape().to(dtype), image(dtype, size=4)


class ConstantGateBroadcast(nn.Module):
    """``act(gate(x)) * (h + h.sum(1, keepdim=True))`` with ``act`` sigmoid (or cos): a removed gate channel
    is ``act(0) ≠ 0``, so the product keeps the broadcast sum instead of clearing it.

    Rules: elementwise (mul, sigmoid), sum, conv. The group of ``a`` and ``gate`` must be inexact; the
    consumer ``b`` stays exact. With ``act="relu"`` (zero at zero) the product clears the sum: all exact."""

    def __init__(self, act: str = "sigmoid") -> None:
        super().__init__()
        self.act = act
        self.a, self.gate, self.b, self.fc = nn.Conv2d(3, 6, 1), nn.Conv2d(3, 6, 1), nn.Conv2d(6, 4, 1), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.a(x))
        g = {"sigmoid": torch.sigmoid, "cos": torch.cos, "relu": torch.relu}[self.act](self.gate(x))
        return self.fc(self.b(g * (h + h.sum(1, keepdim=True))).mean((2, 3)))


def constant_gate_broadcast(dtype: torch.dtype = torch.float32, act: str = "sigmoid") -> Example:
    return ConstantGateBroadcast(act).to(dtype), image(dtype, size=4)
