"""A silent-wrong case found by the HF coverage zoo (issue #21, apertus): removed channels that emitted a constant
smaller than the fold's ``atol`` (1e-6) were removed without folding it, so a consumer without a bias lost it.
Apertus' xIELU activation gives a zero channel ``alpha_n · expm1(-1e-6)``. The constant is now folded."""

from __future__ import annotations

import torch
from torch import nn

from sparsify.testing.oracle import check_exactness, randomize_
from sparsify.testing.rule_models import ExportOnly


class TinyConstantActivation(nn.Module):
    """(Under torch.export, the aten rules.) Linear → ``where(h > 0, h², expm1(min(h, -1e-6)))`` (xIELU's
    shape) → Linear without a bias."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 3, bias=False)
        self.register_buffer("eps", torch.tensor(-1e-6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        return self.b(torch.where(h > 0, h * h, torch.expm1(torch.minimum(h, self.eps))))


def test_a_constant_below_the_fold_tolerance_is_not_dropped() -> None:
    model, x = ExportOnly(TinyConstantActivation()).double(), torch.randn(16, 4, dtype=torch.float64)
    randomize_(model, 0)
    result = check_exactness(model, x, 0.5, 0)
    assert result.max_abs_diff <= 1e-9 * (1 + result.output_scale)


def test_the_same_model_prunes_something() -> None:  # the xfail above fails for the constant, not for no plan
    model, x = ExportOnly(TinyConstantActivation()).double(), torch.randn(16, 4, dtype=torch.float64)
    randomize_(model, 0)
    result = check_exactness(model, x, 0.5, 0)
    assert result.groups_pruned >= 1
