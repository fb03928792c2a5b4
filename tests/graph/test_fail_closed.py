"""Fail closed: when an op rule raises or fails closed, or an op has no rule, every channel space whose
coupling to that op is unknown is a barrier, up through the layout chain that feeds it (issue #21)."""

from __future__ import annotations

import pytest
import torch
import torch.fx
from torch import nn

from sparsify import build_channel_graph
from sparsify.extend import register_op_rule
from sparsify.graph.channel_graph import ChannelGraph
from sparsify.graph.rules import layout, layout_chain


class HeadChain(nn.Module):
    """proj → view into heads → transpose → reshape → out: one layout chain between two projections."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(16, 16)
        self.out = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s = x.shape[0], x.shape[1]
        h = self.proj(x).view(b, s, -1, 4).transpose(1, 2)  # (b, heads, s, head_dim)
        return self.out(h.transpose(1, 2).reshape(b, s, -1))


def _graph() -> ChannelGraph:
    torch.manual_seed(0)
    return build_channel_graph(HeadChain(), torch.randn(2, 3, 16))


def _group_of(cg: ChannelGraph, tensor: str, dim: int = 0):
    return next(g for g in cg.groups if any(m.tensor == tensor and m.dim == dim for m in g.members))


def test_the_chain_is_prunable_when_its_rules_work() -> None:
    assert _group_of(_graph(), "proj.weight").prunable  # the heads of proj: what the tests below take away


@pytest.mark.parametrize("where", ["_classify", "_couple_interior_splits"])
def test_a_layout_rule_raising_at_the_chain_exit_blocks_the_producing_projection(
        monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("rule bug")

    monkeypatch.setattr(layout, where, boom)  # the layout rule of the chain's exit raises mid-analysis
    group = _group_of(_graph(), "proj.weight")
    assert not group.prunable
    assert "failed on" in group.why_not() and "RuntimeError: rule bug" in group.why_not()


def test_a_layout_rule_failing_closed_inside_blocks_the_producing_projection(monkeypatch: pytest.MonkeyPatch) -> None:
    def cannot_run(*args: object, **kwargs: object) -> None:
        raise ValueError("cannot run on an index tensor")

    monkeypatch.setattr(layout_chain, "_apply", cannot_run)  # caught inside the layout rule, which calls block_all
    group = _group_of(_graph(), "proj.weight")
    assert not group.prunable and "could not be analysed" in group.why_not()


def scramble(x: torch.Tensor) -> torch.Tensor:
    """A custom op (one fx node) whose test rule couples a dim, then raises."""
    return x.flip(-1)


torch.fx.wrap("scramble")


class CustomOpNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(16, 16)
        self.mid = nn.Linear(16, 16)
        self.out = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s = x.shape[0], x.shape[1]
        h = scramble(self.proj(x).view(b, s, -1, 4))  # the custom op sits inside a view … reshape chain
        return self.out(self.mid(h.reshape(b, s, -1)))


def _half_then_raise(ctx) -> None:
    x = ctx.node.args[0]
    ctx.same(ctx.space(x, 3), ctx.out(3))  # a coupling declared half-way (here even a wrong one: flip)
    raise NotImplementedError("scramble is not modelled")


register_op_rule("test_scramble_raises", _half_then_raise, functions=(scramble,))


def test_a_custom_rule_that_raises_mid_chain_leaves_nothing_prunable_through_it() -> None:
    torch.manual_seed(0)
    cg = build_channel_graph(CustomOpNet(), torch.randn(2, 3, 16))
    proj = _group_of(cg, "proj.weight")
    assert not proj.prunable
    assert any("test_scramble_raises" in r and "scramble" in r and "NotImplementedError" in r for r in proj.blocked)
    node = next(n.name for n in cg.traced.graph_module.graph.nodes if n.target is scramble)
    assert not [p for p in cg.facts.same if p[1][0] == node]  # its half-declared coupling was dropped
    assert _group_of(cg, "mid.weight").prunable  # behind the next projection the channels are known again


def test_an_op_without_a_rule_blocks_the_chain_before_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from sparsify.graph import collect

    real = collect.find_rule
    monkeypatch.setattr(collect, "find_rule", lambda n, gm: None if n.target is scramble else real(n, gm))
    torch.manual_seed(0)
    cg = build_channel_graph(CustomOpNet(), torch.randn(2, 3, 16))
    proj = _group_of(cg, "proj.weight")
    assert not proj.prunable and "no op rule for scramble()" in proj.why_not()
