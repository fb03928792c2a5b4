"""In-place ATen ops under torch.export (HF gpt_oss's ``add_``, Mixtral's ``/=``) and ``hardtanh`` (HF
MobileNetV1's ReLU6), issue #21: element-wise when nothing else sees the mutation, else a barrier."""

from __future__ import annotations

import torch

from sparsify import build_channel_graph
from sparsify.testing.contracts import TOLERANCE
from sparsify.testing.gather_models import AddOneInPlace, InPlace
from sparsify.testing.oracle import check_exactness, randomize_
from sparsify.testing.rule_models import ExportOnly


def _a_group(cg):
    return next(g for g in cg.groups if any(m.module.endswith(".a") and m.role == "out" for m in g.members))


def test_in_place_op_read_only_through_its_result_is_exact() -> None:
    model = ExportOnly(InPlace()).double()
    x = torch.randn(3, 5, dtype=torch.float64)
    cg = build_channel_graph(model, x)
    kinds = set(cg.facts.rule_of.values())
    assert {"binary_inplace", "aten_hardtanh"} <= kinds, kinds
    assert _a_group(cg).prunable and _a_group(cg).exact, _a_group(cg).why_not()
    randomize_(model, 0)
    result = check_exactness(model, x, 0.5, 0)
    assert model.inner.a.out_features == 3
    assert result.max_abs_diff <= TOLERANCE * (1 + result.output_scale)


def test_in_place_op_whose_input_is_read_after_it_is_a_barrier_under_fx() -> None:
    """Regression: fx's ``h.add_(1.0)`` was element-wise, b read the un-offset ``h`` node, so removed
    channels' 1.0 was never folded into b's bias (relative error ~1 after pruning)."""
    cg = build_channel_graph(AddOneInPlace(), torch.randn(3, 5))
    group = next(g for g in cg.groups if any(m.module == "a" and m.role == "out" for m in g.members))
    assert not group.prunable and "works in place" in group.why_not() and "read after" in group.why_not()


def test_in_place_op_under_export_reads_its_result_and_is_exact() -> None:
    model = ExportOnly(AddOneInPlace()).double()
    x = torch.randn(3, 5, dtype=torch.float64)
    randomize_(model, 0)
    result = check_exactness(model, x, 0.5, 0)
    assert result.groups_pruned >= 1 and model.inner.a.out_features == 3
    assert result.max_abs_diff <= TOLERANCE * (1 + result.output_scale)
