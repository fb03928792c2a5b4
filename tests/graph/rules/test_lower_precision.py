"""A float64 model that computes in float32 inside (HF dory's ``DoryL2Norm``: ``x.float()`` then
``.type_as(x)``) prunes exactly, but its float32 sums over a narrower width round in another order: the
error is float32 rounding, not a missed constant. The graph names where the model drops precision, and the
coverage zoo's oracle then judges it by that precision's tolerance instead of calling it a FAIL (issue #21)."""

from __future__ import annotations

import torch
from torch import nn

from benchmarks import coverage
from sparsify import build_channel_graph
from sparsify.graph.precision import REL_TOLERANCE, lower_precision


class Float32UnitNorm(nn.Module):
    """Linear → unit norm computed in float32 → Linear, the smallest form of dory's L2 norm."""

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.up = nn.Linear(16, width)
        self.down = nn.Linear(width, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x).float()
        h = h * torch.rsqrt(h.pow(2).sum(-1, keepdim=True) + 1e-6)
        return self.down(h.type_as(x))


class Float64UnitNorm(Float32UnitNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)
        return self.down(h * torch.rsqrt(h.pow(2).sum(-1, keepdim=True) + 1e-6))


def _example(cls: type[nn.Module], dtype: torch.dtype = torch.float64) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return cls().to(dtype).eval(), torch.randn(4, 16, dtype=dtype)


def test_graph_names_the_node_that_drops_to_float32() -> None:
    model, x = _example(Float32UnitNorm)
    lower = lower_precision(build_channel_graph(model, x).traced)
    assert lower is not None and lower.dtype == torch.float32 and lower.model_dtype == torch.float64
    assert lower.node == "float_1" and "float32 inside a float64 model" in lower.describe()
    assert lower.rel_tolerance == REL_TOLERANCE[torch.float32] > REL_TOLERANCE[torch.float64]


def test_no_lower_precision_when_the_model_computes_in_its_own_dtype() -> None:
    for cls, dtype in ((Float64UnitNorm, torch.float64), (Float32UnitNorm, torch.float32)):
        model, x = _example(cls, dtype)
        assert lower_precision(build_channel_graph(model, x).traced) is None


def test_coverage_oracle_judges_float32_compute_by_float32_rounding() -> None:
    model, x = _example(Float32UnitNorm)
    rec = coverage.check_ours((model, x, []))
    assert rec["pruned_groups"] == 1 and rec["rel_tol"] == REL_TOLERANCE[torch.float32], rec
    assert rec["result"] == "exact" and 0 < rec["rel_error"] <= rec["rel_tol"], rec
    assert "float32" in rec["precision"] and "float_1" in rec["precision"]


def test_coverage_oracle_stays_strict_in_float64() -> None:
    model, x = _example(Float64UnitNorm)
    rec = coverage.check_ours((model, x, []))
    assert rec["result"] == "exact" and rec["rel_error"] <= coverage.REL_TOL and "precision" not in rec, rec
