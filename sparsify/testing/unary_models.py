"""The contract model of the ``aten_unary_more`` op rule (sparsify/graph/rules/aten_unary_more.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sparsify.testing.rule_models import Example, export_only


class MoreUnaryNet(nn.Module):
    """conv → ReLU → expm1 + softplus + log1p + erf, cast with ``type_as`` → conv → Linear, under torch.export.

    Rules: aten_unary_more, aten_binary, aten_conv."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.fc = nn.Conv2d(3, 6, 1), nn.Conv2d(6, 4, 1), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x))
        h = torch.expm1(-h) + F.softplus(h) + torch.log1p(h) + torch.erf(h)
        return self.fc(self.b(h.type_as(x)).mean(dim=(2, 3)))


def _more_unary_net(dtype: torch.dtype = torch.float32) -> Example:
    g = torch.Generator().manual_seed(0)
    return MoreUnaryNet().to(dtype), torch.randn(2, 3, 4, 4, generator=g).to(dtype)


more_unary_net = export_only(_more_unary_net)
