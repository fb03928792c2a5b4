"""Silent-wrong cases the coverage zoo found (issue #21): each built a group the graph called exact whose
pruning changed the outputs. Each model must now pass the oracle, with the offending group refused or
marked inexact for the reason that names the op."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sparsify.testing.oracle import check_exactness, randomize_


class ChannelSumBroadcast(nn.Module):
    """``h + h.sum(1, keepdim=True)``: a removed (zero) channel of h becomes the sum, which the next conv reads."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.fc = nn.Conv2d(3, 6, 1), nn.Conv2d(6, 4, 1), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.a(x))
        return self.fc(self.b(h + h.sum(1, keepdim=True)).mean((2, 3)))


class InputWidthReshape(nn.Module):
    """Heads hard-coded, the output reshaped with C read from the *input's* shape (timm's nextvit attention)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.heads, self.hd = dim // 4, 4
        self.v, self.proj = nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        v = self.v(x).reshape(b, n, self.heads, self.hd).transpose(1, 2)
        return self.proj(v.transpose(1, 2).reshape(b, n, c))


def test_broadcast_channel_sum_is_not_offered_as_exact() -> None:
    model, x = ChannelSumBroadcast().double(), torch.randn(2, 3, 4, 4, dtype=torch.float64)
    randomize_(model, 0)
    result = check_exactness(model, x, 0.5, 0)
    assert result.max_abs_diff <= 1e-9 * (1 + result.output_scale)
    a = result.graph.group("a")
    assert a.prunable and not a.exact
    assert "broadcast" in a.inexact[0] and "'b.weight' reads them" in a.inexact[0]
    assert result.graph.group("b").exact  # b's own output channels are untouched by the broadcast


def test_size_read_from_the_input_shape_blocks_the_input_width() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), InputWidthReshape(16), nn.ReLU(), nn.Linear(16, 4)).double()
    x = torch.randn(1, 5, 8, dtype=torch.float64)
    result = check_exactness(model, x)
    assert result.max_abs_diff <= 1e-9 * (1 + result.output_scale)
    # the input width c and v's output width are coupled by reshape(b, n, c): one group, or refused
    group = next(g for g in result.graph.groups if any(m.tensor == "0.weight" and m.dim == 0 for m in g.members))
    assert any(m.tensor == "1.v.weight" and m.dim == 0 for m in group.members)
    assert not group.prunable


class ForeignWidthView(nn.Module):
    """``y.view(b, n, c)`` with c read from x (the block input): y's width and x's must stay equal."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.y, self.out = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        b, n, c = h.shape
        return self.out(torch.relu(self.y(h).reshape(b * n, c).reshape(b, n, c)))


def test_a_size_read_from_another_tensor_couples_the_widths_into_one_group() -> None:
    torch.manual_seed(0)
    model, x = ForeignWidthView().double(), torch.randn(2, 5, 4, dtype=torch.float64)
    result = check_exactness(model, x)
    assert result.max_abs_diff <= 1e-9 * (1 + result.output_scale)
    group = next(g for g in result.graph.groups if any(m.tensor == "a.weight" and m.dim == 0 for m in g.members))
    assert {(m.tensor, m.dim) for m in group.members} >= {("a.weight", 0), ("y.weight", 0), ("out.weight", 1)}
    assert group.exact and result.groups_pruned >= 1


class ComputedForeignSize(nn.Module):
    """``y.reshape(b, n, 2, c // 2)`` with c read from x: a computed size of another tensor is a barrier."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.y, self.out = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        b, n, c = h.shape
        return self.out(self.y(h).reshape(b, n, 2, c // 2).flatten(2))


def test_a_computed_size_of_another_tensor_is_a_barrier_that_names_it() -> None:
    model, x = ComputedForeignSize().double(), torch.randn(2, 5, 4, dtype=torch.float64)
    result = check_exactness(model, x)
    assert result.max_abs_diff <= 1e-9 * (1 + result.output_scale)
    a = result.graph.group("a")
    assert not a.prunable and any("the shape of another tensor" in r for r in a.blocked)


class ScaledByItsOwnSize(nn.Module):
    """DeBERTa's attention scale: ``q / torch.tensor(q.size(-1)).sqrt()``, baked into a constant by export."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.out = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.q(x)
        if q.shape[-1] > 1:  # a branch on a shape: fx cannot trace it, torch.export can
            q = q / torch.sqrt(torch.tensor(q.size(-1), dtype=q.dtype))
        return self.out(q)


def test_a_scale_baked_from_a_size_by_export_makes_the_channels_inexact() -> None:
    model, x = ScaledByItsOwnSize().double(), torch.randn(2, 4, dtype=torch.float64)
    result = check_exactness(model, x)
    assert any("lifted_tensor" in str(n.target) for n in result.graph.traced.graph.nodes)
    assert result.max_abs_diff <= 1e-9 * (1 + result.output_scale)
    q = next(g for g in result.graph.groups if any(m.tensor == "q.weight" and m.dim == 0 for m in g.members))
    assert not q.exact and "bakes in as a constant" in q.inexact[0]


class DeadShapeRead(nn.Module):
    """CLIPSeg's position table: a value made only for its shape (``w.unsqueeze(0).shape[1]``) chooses a branch;
    torch.export keeps the dead unsqueeze, whose coupling of the table's rows must not make them prunable."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Embedding(3, 4)
        self.register_buffer("ids", torch.arange(3)[None])
        self.out = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = self.table.weight.unsqueeze(0).shape[1]
        pos = self.table(self.ids) if rows == x.shape[1] else self.table(self.ids[:, :1])
        return self.out(x + pos)


def test_a_value_nothing_uses_does_not_couple_a_parameter_dim() -> None:
    model, x = DeadShapeRead().double(), torch.randn(2, 3, 4, dtype=torch.float64)
    result = check_exactness(model, x)  # the branch on a shape: torch.export, not fx
    assert any(not n.users and n.op == "call_function" for n in result.graph.traced.graph.nodes)  # the unsqueeze
    assert result.max_abs_diff <= 1e-9 * (1 + result.output_scale)
    rows = [g for g in result.graph.groups if any(m.tensor == "table.weight" and m.dim == 0 for m in g.members)]
    assert all(not g.prunable for g in rows)
