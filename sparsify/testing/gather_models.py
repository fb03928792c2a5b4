"""Contract models for selection by indices and in-place ops (``sparsify/graph/rules/gather.py`` and
``aten_inplace.py``; issue #21): a Mixture-of-Experts layer, token gathers, layout ops of HF Falcon and
in-place element-wise ops. Each builder returns ``(model, example_inputs)`` in the requested dtype and
names the rules it is for; the classes are also the fixtures of the rules' own tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sparsify.testing.rule_models import Example, export_only


def _randn(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0)).to(dtype)


# ----- selection by a tensor of indices ------------------------------------------------------------
class BatchedExperts(nn.Module):
    """A Mixture-of-Experts layer in the shape of transformers 5's batched experts: the router's top-k
    picks experts, ``w[expert_ids]`` gathers per-expert weights of shape (experts, out, in), the tokens
    are repeated once per pick. The expert dim is data-selected (a barrier); the experts' inner neurons
    are one exact group, pruned in every expert at once.

    Rules: topk, repeat_interleave, the tensor index (layout under fx, aten_index_tensor under export),
    linear, matmul."""

    def __init__(self, hidden: int = 8, inner: int = 6, experts: int = 4, top: int = 2) -> None:
        super().__init__()
        self.top = top
        self.embed = nn.Linear(5, hidden)
        self.router = nn.Linear(hidden, experts, bias=False)
        self.gate_up = nn.Parameter(torch.randn(experts, 2 * inner, hidden) / hidden**0.5)
        self.down = nn.Parameter(torch.randn(experts, hidden, inner) / inner**0.5)
        self.head = nn.Linear(hidden, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        weights, ids = torch.topk(self.router(h).softmax(-1), self.top, dim=-1)
        ids = ids.reshape(-1)
        rows = h.repeat_interleave(self.top, 0)
        up = torch.bmm(self.gate_up[ids], rows.unsqueeze(-1)).squeeze(-1)
        gate, up = up.chunk(2, dim=-1)
        y = torch.bmm(self.down[ids], (F.silu(gate) * up).unsqueeze(-1)).squeeze(-1)
        y = (y * weights.reshape(-1, 1)).reshape(-1, self.top, y.shape[-1]).sum(1)
        return self.head(h + y)


def batched_experts(dtype: torch.dtype = torch.float32) -> Example:
    return BatchedExperts().to(dtype), _randn(7, 5, dtype=dtype)


class GatherTokens(nn.Module):
    """``aten.index.Tensor(h, [None, idx])`` on the token dim, idx a model input: the feature dim passes
    through, so ``a``'s outputs stay an exact group.

    Rules: aten_index_tensor, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(5, 6), nn.Linear(6, 2)

    def forward(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return self.b(torch.ops.aten.index.Tensor(self.a(x), [None, idx]))


def gather_tokens(dtype: torch.dtype = torch.float32) -> Example:
    return GatherTokens().to(dtype), (_randn(2, 4, 5, dtype=dtype), torch.tensor([3, 0, 0, 2]))


class IndexSelectTokens(nn.Module):
    """``h.index_select(1, idx)`` on the token dim, idx a model input: ``a``'s outputs stay exact.

    Rules: index_select, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(5, 6), nn.Linear(6, 2)

    def forward(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)).index_select(1, idx))


def index_select_tokens(dtype: torch.dtype = torch.float32) -> Example:
    return IndexSelectTokens().to(dtype), (_randn(2, 4, 5, dtype=dtype), torch.tensor([3, 0, 0, 2, 1]))


class GatherChannels(nn.Module):
    """A data-dependent index on the channel dim itself (``aten.index`` or ``index_select``): a barrier."""

    def __init__(self, op: str = "index") -> None:
        super().__init__()
        if op not in ("index", "index_select"):
            raise ValueError(f"op must be 'index' or 'index_select', not {op!r}")
        self.op = op
        self.a, self.b = nn.Linear(5, 6), nn.Linear(6, 2)

    def forward(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        h = h.index_select(1, idx) if self.op == "index_select" else torch.ops.aten.index.Tensor(h, [None, idx])
        return self.b(h)


class IndexBufferTable(nn.Module):
    """A relative-position table read through an integer index buffer, Swin's bias:
    ``table[index.view(-1)]`` (or ``index_select``) added to ``a``'s outputs. The buffer's dims are the
    positions the gather selects, not channels: pruning them would shrink the selection while ``a``'s rows
    keep their count (HF MaskFormer's Swin backbone raised a size mismatch; with equal sizes elsewhere it
    would be silently wrong). Under export the view stays in the graph; under fx it is folded to a constant.

    Rules: aten_index_tensor / index_select (the index tensor's own dims), layout (view), linear."""

    def __init__(self, size: int = 3, heads: int = 2, op: str = "index") -> None:
        super().__init__()
        if op not in ("index", "index_select"):
            raise ValueError(f"op must be 'index' or 'index_select', not {op!r}")
        self.op = op
        self.table = nn.Parameter(torch.randn(2 * size - 1, heads))
        pos = torch.arange(size)
        self.register_buffer("index", pos[:, None] - pos[None, :] + size - 1)
        self.a = nn.Linear(heads, heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = self.index.view(-1)
        bias = self.table.index_select(0, flat) if self.op == "index_select" else self.table[flat]
        return self.a(x) + bias


def index_buffer_table(dtype: torch.dtype = torch.float32, op: str = "index") -> Example:
    """``IndexBufferTable`` and tokens of shape (size², heads)."""
    return IndexBufferTable(op=op).to(dtype), _randn(9, 2, dtype=dtype)


class RepeatAndTranspose(nn.Module):
    """``h.repeat(1, 2)`` and ``.T`` (HF Falcon's numpy_T): layout ops."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(5, 6), nn.Linear(12, 3), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(self.b(self.a(x).repeat(1, 2)).T)


class TransposedOutput(nn.Module):
    """``a``'s channels become the rows of the output (``.T``): not prunable."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.c = nn.Linear(5, 6), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(self.a(x).T)


# ----- in-place ops --------------------------------------------------------------------------------
class InPlace(nn.Module):
    """``h.mul_(g(x))`` then ``hardtanh`` (HF MobileNetV1's ReLU6). With ``read_after``, ``h`` is read
    again after its mutation (a barrier under fx); without, only its value before (``early``) is.

    Rules (under export): binary_inplace, aten_hardtanh, aten_linear, aten_binary."""

    def __init__(self, read_after: bool = False) -> None:
        super().__init__()
        self.read_after = read_after
        self.a, self.g, self.b = nn.Linear(5, 6), nn.Linear(5, 6), nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        early = h * 2.0
        y = h.mul_(self.g(x))
        y = F.hardtanh(y, 0.0, 6.0)
        return self.b(y + h) if self.read_after else self.b(y + early)


def _in_place(dtype: torch.dtype = torch.float32) -> Example:
    return InPlace().to(dtype), _randn(3, 5, dtype=dtype)


in_place = export_only(_in_place)


class AddOneInPlace(nn.Module):
    """``h.add_(1.0)`` whose result is dropped: ``b`` reads the mutated ``h``."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(5, 6), nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x))
        h.add_(1.0)
        return self.b(h)


class SigmoidInPlace(nn.Module):
    """``a(x).sigmoid_()`` read only through its result → Linear: ``a``'s outputs stay exact.

    Rules: unary_inplace, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(5, 6), nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x).sigmoid_())


def sigmoid_in_place(dtype: torch.dtype = torch.float32) -> Example:
    return SigmoidInPlace().to(dtype), _randn(3, 5, dtype=dtype)
