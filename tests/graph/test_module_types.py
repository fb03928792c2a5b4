"""register_module_type: one call binds a module type's op rule, leaf-ness, synced sizes and attribute sync."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from sparsify import build_channel_graph
from sparsify.extend import register_module_type, register_op_rule
from sparsify.graph.module_types import ATTRIBUTE_SYNCS, SYNCED_SIZES, attribute_sync_of, class_has_synced_sizes
from sparsify.graph.op_rules import OP_RULES
from sparsify.graph.rules.common import couple_elementwise
from sparsify.graph.trace import LEAF_MODULES
from sparsify.registry import TypeRegistry
from sparsify.testing.oracle import check_exactness

TOL = 1e-10


def _scale_rule(ctx: Any) -> None:
    """Element-wise; ``scale`` is sliced with the channels."""
    couple_elementwise(ctx, ctx.node.args[0])
    ctx.member(ctx.out(1), ctx.module_name, "scale", 0, "scale")


def _sync_channels(m: nn.Module, old: dict[str, Any]) -> None:
    m.channels = m.scale.shape[0]


class GatedScale(nn.Module):
    """tanh(x) · scale; its forward branches on a parameter's value, which fx cannot trace (so it must be a leaf)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels
        self.scale = nn.Parameter(torch.rand(channels) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale.sum() > -1e9:
            x = torch.tanh(x)
        return x * self.scale.view(1, self.channels, 1, 1)


register_module_type(GatedScale, rule=_scale_rule, leaf=True, synced_sizes=True, sync=_sync_channels)


def _net(block: type[nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), block(8), nn.Conv2d(8, 4, 1)).double()


def test_one_call_binds_every_facet() -> None:
    assert LEAF_MODULES.find(GatedScale) is True
    assert class_has_synced_sizes(GatedScale)
    assert ATTRIBUTE_SYNCS.get(GatedScale) is _sync_channels
    assert OP_RULES.get("gated_scale").fn is _scale_rule and OP_RULES.modules.get(GatedScale).kind == "gated_scale"


def test_a_model_using_the_registered_type_prunes_exactly() -> None:
    model, x = _net(GatedScale), torch.randn(2, 3, 10, 10, dtype=torch.float64)
    cg = build_channel_graph(model, x)
    assert [n.op for n in cg.traced.graph.nodes if n.target == "1"] == ["call_module"]  # a leaf
    group = next(g for g in cg.groups if any(m.module == "1" for m in g.members))
    assert group.prunable and group.exact, group.why_not()
    result = check_exactness(model, x)
    assert result.groups_pruned >= 1 and result.max_abs_diff < TOL
    assert model[1].channels == model[1].scale.shape[0] < 8  # the sync ran
    assert model[1](torch.randn(1, model[1].channels, 2, 2, dtype=torch.float64)).shape[1] == model[1].channels


class DottedScale(GatedScale):
    """Registered by its dotted name, as a class of an optional package would be."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # its own forward: the base's rule does not apply
        return torch.tanh(x) * self.scale.view(1, self.channels, 1, 1)


def test_dotted_name_registration() -> None:
    name = f"{DottedScale.__module__}.{DottedScale.__qualname__}"
    assert OP_RULES.modules.find(DottedScale, accept=lambda base: DottedScale.forward is base.forward) is None
    assert not class_has_synced_sizes(DottedScale)  # its forward is not the one declared
    assert register_module_type(name, rule=_scale_rule, leaf=True) == name
    model, x = _net(DottedScale), torch.randn(2, 3, 10, 10, dtype=torch.float64)
    result = check_exactness(model, x)
    assert result.groups_pruned >= 1 and result.max_abs_diff < TOL
    assert model[1].channels == model[1].scale.shape[0]  # the sync inherited from GatedScale (by MRO)
    with pytest.raises(ValueError, match="override=True"):  # the class object is the same key
        register_module_type(DottedScale, leaf=True, rule=lambda ctx: None)


class SameForward(GatedScale):
    """Keeps GatedScale's forward: inherits its rule, leaf, synced sizes and sync."""


class OwnForward(GatedScale):
    """Overrides forward: inherits the leaf and the sync, not the rule nor the synced sizes."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale.view(1, self.channels, 1, 1)


def test_look_ups_walk_the_mro() -> None:
    assert LEAF_MODULES.find(OwnForward) and attribute_sync_of(OwnForward(2)) is _sync_channels
    assert class_has_synced_sizes(SameForward) and not class_has_synced_sizes(OwnForward)
    model, x = _net(SameForward), torch.randn(2, 3, 10, 10, dtype=torch.float64)
    result = check_exactness(model, x)
    assert result.groups_pruned >= 1 and result.max_abs_diff < TOL
    cg = build_channel_graph(_net(OwnForward), torch.randn(2, 3, 10, 10, dtype=torch.float64))
    group = next(g for g in cg.groups if any(m.module == "0" and m.role == "out" for m in g.members))
    assert not group.prunable and "op rule" in group.why_not()


class ZerosState(nn.Module):
    """A GRUCell loop from zeros sized by the cell's (synced) hidden_size."""

    def __init__(self) -> None:
        super().__init__()
        self.pre, self.cell, self.fc = nn.Linear(5, 7), nn.GRUCell(7, 6), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.zeros(x.shape[0], self.cell.hidden_size, dtype=x.dtype)
        x = self.pre(x)
        for t in range(x.shape[1]):
            h = self.cell(x[:, t], h)
        return self.fc(h)


def test_synced_sizes_free_the_zeros_a_module_makes() -> None:
    x = torch.randn(2, 4, 5, dtype=torch.float64)

    def units(model: nn.Module) -> Any:
        return next(g for g in build_channel_graph(model, x).groups if g.kind == "rnn_unit")

    assert not units(ZerosState().double()).prunable  # zeros of a constant width
    register_module_type(ZerosState, synced_sizes=True)
    assert units(ZerosState().double()).prunable
    result = check_exactness(ZerosState().double(), x)
    assert result.groups_pruned >= 1 and result.max_abs_diff < TOL


def test_decorator_form_and_idempotence() -> None:
    @register_module_type(leaf=True, sync=_sync_channels)
    class Decorated(GatedScale):
        pass

    assert isinstance(Decorated, type) and LEAF_MODULES.registered(Decorated) is True
    assert ATTRIBUTE_SYNCS.registered(Decorated) is _sync_channels
    register_module_type(Decorated, leaf=True, sync=_sync_channels)  # the same binding again: a no-op


def test_duplicates_raise_unless_override_and_nothing_is_half_registered() -> None:
    class Twice(nn.Module):
        pass

    def other(m: nn.Module, old: dict[str, Any]) -> None:
        m.touched = True

    register_module_type(Twice, sync=_sync_channels)
    with pytest.raises(ValueError, match=r"attribute sync for .*Twice.* is already registered.*override=True"):
        register_module_type(Twice, leaf=True, sync=other)
    assert LEAF_MODULES.registered(Twice) is None  # the conflicting call registered nothing
    register_module_type(Twice, sync=other, override=True)
    module = Twice()
    attribute_sync_of(module)(module, {})
    assert module.touched
    register_module_type(Twice, rule=_scale_rule)
    with pytest.raises(ValueError, match="override=True"):
        register_module_type(Twice, rule=lambda ctx: None)
    with pytest.raises(ValueError, match="already has op rule"):
        register_op_rule("twice_tanh", _scale_rule, functions=[torch.tanh])


def test_dotted_name_and_class_are_one_key() -> None:
    class Spelled(nn.Module):
        pass

    register_module_type(Spelled, synced_sizes=True, sync=_sync_channels)
    name = f"{Spelled.__module__}.{Spelled.__qualname__}"
    assert SYNCED_SIZES.registered(name) is True
    register_module_type(name, synced_sizes=True, sync=_sync_channels)  # the same bindings: a no-op
    with pytest.raises(ValueError, match="override=True"):
        register_module_type(name, sync=lambda m, old: None)


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"rule": "my_rule"}, TypeError, "rule must be a callable"),
    ({"sync": 3}, TypeError, "sync must be a callable"),
    ({"leaf": "yes"}, TypeError, "leaf must be True or False"),
    ({}, ValueError, "binds nothing"),
])
def test_bad_arguments(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    class Target(nn.Module):
        pass

    with pytest.raises(error, match=match):
        register_module_type(Target, **kwargs)
    assert "target" not in OP_RULES and LEAF_MODULES.registered(Target) is None


def test_bad_classes_and_op_rules() -> None:
    with pytest.raises(TypeError, match=r"nn\.Module class or a dotted class name"):
        register_module_type(int, leaf=True)
    with pytest.raises(ValueError, match="not a dotted name"):
        register_module_type("NoDots", leaf=True)
    with pytest.raises(TypeError, match="fn must be a callable"):
        register_op_rule("not_callable", "scaled_tanh")  # issue #17
    with pytest.raises(TypeError, match=r"modules must be nn\.Module classes"):
        register_op_rule("bad_modules", _scale_rule, modules=[int])
    with pytest.raises(TypeError, match="sequences"):
        register_op_rule("bad_single", _scale_rule, methods="cumsum")
    assert "not_callable" not in OP_RULES and "bad_modules" not in OP_RULES


def test_type_registry_explains_a_failed_look_up() -> None:
    table: TypeRegistry[int] = TypeRegistry("widget", "Register one with register_widget(cls).")
    table.register("torch.nn.modules.linear.Linear", 1)
    assert table.get(nn.LazyLinear) == 1  # a subclass of Linear
    with pytest.raises(KeyError, match=r"no widget for 'torch.nn.modules.conv.Conv2d'.*Linear.*register_widget"):
        table.get(nn.Conv2d)
