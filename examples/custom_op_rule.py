"""Teach sparsify a custom module: without a rule its channels are a barrier; with one they prune exactly.

One call, ``sparsify.extend.register_module_type(cls, rule=..., leaf=..., synced_sizes=..., sync=...)``,
binds everything about a module type.

Run: python examples/custom_op_rule.py
"""

from __future__ import annotations

import torch
from torch import nn

import sparsify
from sparsify.graph.rules.common import couple_elementwise
from sparsify.testing.oracle import check_exactness


class ScaledTanh(nn.Module):
    """tanh(x) · scale, with a learnable per-channel scale."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels
        self.scale = nn.Parameter(torch.rand(channels) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x) * self.scale[:, None, None]


def build() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3), ScaledTanh(8), nn.Conv2d(8, 4, 1), nn.Flatten(), nn.LazyLinear(2))


def scaled_tanh_rule(ctx: sparsify.graph.builder.OpContext) -> None:
    """Element-wise; ``scale`` is sliced with the channels."""
    couple_elementwise(ctx, ctx.node.args[0])
    ctx.member(ctx.out(1), ctx.module_name, "scale", 0, "scale")


def sync_scaled_tanh(module: ScaledTanh, old_attributes: dict) -> None:
    """After pruning: ``channels`` follows the sliced ``scale``."""
    module.channels = module.scale.shape[0]


def main() -> float:
    x = torch.randn(2, 3, 10, 10)
    model = build()
    model(x)  # materialise the lazy layer
    sparsify.extend.register_module_type(ScaledTanh, leaf=True)  # one node in the graph, no rule yet
    blocked = [g for g in sparsify.build_channel_graph(model, x).groups if "ScaledTanh" in g.why_not()]
    print("without a rule:", blocked[0].why_not() if blocked else "?")
    # the rule and the attribute sync (normally given in the same call as leaf=True)
    sparsify.extend.register_module_type(ScaledTanh, rule=scaled_tanh_rule, sync=sync_scaled_tanh)
    result = check_exactness(model.double(), x.double())
    assert model[1].channels == model[1].scale.shape[0]
    print(f"with the rule: pruned {result.groups_pruned} groups, max |difference| = {result.max_abs_diff:.1e}")
    return result.max_abs_diff


if __name__ == "__main__":
    main()
