"""Inside the package every module type is registered with the one call, ``register_module_type``; the
single-facet functions stay public thin wrappers in ``sparsify.extend`` for users (issue #16)."""

from __future__ import annotations

import ast
from pathlib import Path

import torch
from torch import nn

import sparsify
import sparsify.extend
from sparsify.graph.module_types import attribute_sync_of
from sparsify.graph.trace import LEAF_MODULES
from sparsify.nn import ConvAddReLU, ConvReLU, ExplicitMultiheadAttention, LowRankConv2d, LowRankLinear, SpaceToDepth

PACKAGE = Path(sparsify.__file__).parent
OLD_STYLE = {"register_leaf_module", "register_attribute_sync", "register_synced_sizes"}
TABLES = {"LEAF_MODULES", "ATTRIBUTE_SYNCS", "SYNCED_SIZES"}
# where the wrappers and the tables are defined (and extend.py, which re-exports the wrappers)
DEFINING = {"extend.py", "graph/trace.py", "prune/attributes.py", "graph/module_types.py"}


def _old_style_registrations(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Call) and not isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            continue
        # calls (decorator calls included, ast.walk visits them) and bare decorators (@register_leaf_module)
        bare = [d for d in getattr(node, "decorator_list", []) if not isinstance(d, ast.Call)]
        calls = [node] if isinstance(node, ast.Call) else bare
        for call in calls:
            fn = call.func if isinstance(call, ast.Call) else call
            if isinstance(fn, ast.Name) and fn.id in OLD_STYLE:
                found.append(f"{fn.id} (line {call.lineno})")
            if (isinstance(fn, ast.Attribute) and fn.attr == "register" and isinstance(fn.value, ast.Name)
                    and fn.value.id in TABLES):
                found.append(f"{fn.value.id}.register (line {call.lineno})")
    return found


def test_the_package_registers_module_types_only_with_register_module_type() -> None:
    offenders = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel not in DEFINING and (found := _old_style_registrations(path)):
            offenders[rel] = found
    assert not offenders, f"use sparsify.graph.module_types.register_module_type instead: {offenders}"


def test_the_scan_sees_an_old_style_registration(tmp_path: Path) -> None:
    source = tmp_path / "m.py"
    source.write_text("@register_leaf_module\nclass A: ...\n"
                      "register_attribute_sync(A)(f)\nLEAF_MODULES.register(A, True)\n")
    assert len(_old_style_registrations(source)) == 3


def test_the_single_facet_functions_stay_public_in_extend() -> None:
    assert callable(sparsify.extend.register_leaf_module) and callable(sparsify.extend.register_attribute_sync)


def test_the_nn_module_types_keep_their_facets() -> None:
    for cls in (ConvReLU, ConvAddReLU, SpaceToDepth):
        assert LEAF_MODULES.find(cls)
    for module in (LowRankLinear(4, 3, rank=2), LowRankConv2d(4, 3, 1, rank=2),
                   ExplicitMultiheadAttention(nn.MultiheadAttention(8, 2))):
        assert attribute_sync_of(module) is not None
    low_rank = LowRankLinear(4, 3, rank=2)
    low_rank.U = nn.Parameter(torch.zeros(5, 1))
    attribute_sync_of(low_rank)(low_rank, {})
    assert (low_rank.out_features, low_rank.rank) == (5, 1)


class _Opaque(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flip(1)


class _OpaqueNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.opaque = _Opaque()
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.opaque(self.conv(x)))


def test_a_module_without_a_rule_points_to_register_module_type() -> None:
    sparsify.extend.register_module_type(_Opaque, leaf=True)  # a leaf without a rule: a barrier
    graph = sparsify.build_channel_graph(_OpaqueNet(), torch.randn(1, 3, 4, 4))
    (group,) = [g for g in graph.groups if any(m.tensor == "conv.weight" and m.dim == 0 for m in g.members)]
    why = group.why_not()
    assert not group.prunable and "no op rule for" in why
    assert "register_module_type(_Opaque, rule=fn)" in why and "register_op_rule" not in why
