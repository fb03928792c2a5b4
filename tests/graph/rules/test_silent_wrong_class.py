"""Issue #21's sweep of the silent-wrong class: small hand-built models of fused projections cut into roles,
partial rotary, interleaved and per-layer head layouts, shared weights, sliding-window layers, parallel
blocks, repeated key/value heads, biases after reshapes, and a gate whose removed channels are a non-zero
constant. Each passes the exactness oracle under fx and under torch.export, with the groups it may prune
named here (a group that moves is a change to look at), and the refused ones refused for their reason."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from sparsify.errors import InexactPruneError
from sparsify.graph.channel_graph import ChannelGraph, ChannelGroup
from sparsify.testing.models import attention_variants, fused_roles
from sparsify.testing.models.common import Example
from sparsify.testing.oracle import OracleResult, check_exactness, randomize_
from sparsify.testing.rule_models import ExportOnly

TOL = 1e-10
FRONTS = ("fx", "export")


def _stack(name: str) -> Callable[[torch.dtype], Example]:
    return lambda dtype: attention_variants.attention_stack(name, dtype)


_HEADS2 = ("attn.0.q (+2)", "attn.1.q (+2)", "mlps.0.0", "mlps.1.0")
#: name → (builder, exact prunable groups under fx, under torch.export; None: the same)
CASES: dict[str, tuple[Callable[[torch.dtype], Example], tuple[str, ...], tuple[str, ...] | None]] = {
    "fused_gate_up_mlp": (fused_roles.fused_gate_up_mlp, ("embed (+1)", "gate_up"), None),
    "split_by_size_roles": (fused_roles.split_by_size_roles, ("embed",), None),
    "modulation_chunk": (fused_roles.modulation_chunk, ("mod (+1)",), ("a (+1)",)),  # one group, named apart
    "shared_across_roles": (fused_roles.shared_across_roles, ("a (+1)", "shared"), None),
    "bias_after_reshape": (fused_roles.bias_after_reshape, ("b",), None),
    "sigmoid_gate_broadcast": (fused_roles.constant_gate_broadcast, ("b",), None),
    "cos_gate_broadcast": (lambda dtype: fused_roles.constant_gate_broadcast(dtype, "cos"), ("b",), None),
    "partial_rotary": (_stack("partial_rotary"), ("mlps.0.0", "mlps.1.0"), None),
    "interleaved_qkv": (_stack("interleaved_qkv"), ("mlps.0.0",), None),
    "per_layer_heads": (_stack("per_layer_heads"), _HEADS2, None),
    "shared_qk": (_stack("shared_qk"), ("attn.0.q (+1)", "mlps.0.0"), ("attn.0.q.weight (+1)", "mlps.0.0")),
    "sliding_then_full": (_stack("sliding_then_full"), _HEADS2, None),
    "parallel_blocks": (_stack("parallel_blocks"), _HEADS2, None),
    # repeat_interleave of KV heads (rules/gather): each KV group's copies go with it, under both front ends
    "gqa_repeat_interleave": (_stack("gqa_repeat_interleave"), ("attn.0.q (+2)", "mlps.0.0"), None),
    "gqa_expand": (_stack("gqa_expand"), ("attn.0.q (+2)", "mlps.0.0"), ("mlps.0.0",)),  # export bakes the heads in
    "head_bias_after_split": (_stack("head_bias_after_split"), ("attn.0.q (+3)", "mlps.0.0"),
                              ("attn.0.q_bias (+3)", "mlps.0.0")),
}


def _oracle(name: str, front: str, keep_bias: bool = False) -> OracleResult:
    model, x = CASES[name][0](torch.float64)
    randomize_(model, 0)
    return check_exactness(ExportOnly(model) if front == "export" else model, x, 0.5, 0, keep_bias=keep_bias)


def _exact_names(cg: ChannelGraph) -> list[str]:
    return sorted(g.name.removeprefix("inner.") for g in cg.groups if g.prunable and g.exact)


def _group_of(cg: ChannelGraph, tensor: str) -> ChannelGroup:
    """The group of ``tensor``'s output channels (dim 0), under either front end."""
    return next(g for g in cg.groups if any(m.tensor.removeprefix("inner.") == tensor and m.dim == 0
                                            for m in g.members))


@pytest.mark.parametrize("front", FRONTS)
@pytest.mark.parametrize("name", list(CASES))
def test_oracle_prunes_only_the_expected_groups(name: str, front: str) -> None:
    _, fx_groups, export_groups = CASES[name]
    expected = sorted(export_groups if front == "export" and export_groups is not None else fx_groups)
    result = _oracle(name, front)
    assert _exact_names(result.graph) == expected
    assert result.groups_pruned == len(expected)
    assert result.max_abs_diff <= TOL * (1 + result.output_scale)
    assert result.report.params_after < result.report.params_before


@pytest.mark.parametrize("front", FRONTS)
@pytest.mark.parametrize("act", ["sigmoid", "cos"])
def test_a_constant_gate_does_not_clear_a_broadcast_in_a_product(act: str, front: str) -> None:
    """``act(gate(x)) * (h + h.sum(1))``: a removed gate channel is act(0) ≠ 0, so the product of the removed
    channel is the broadcast sum, which the next conv reads. This group used to be offered as exact."""
    result = _oracle(f"{act}_gate_broadcast", front)
    group = _group_of(result.graph, "gate.weight")
    assert any(m.tensor.removeprefix("inner.") == "a.weight" for m in group.members)
    assert group.prunable and not group.exact
    assert "broadcast" in group.inexact[0] and "b.weight' reads them" in group.inexact[0]


@pytest.mark.parametrize("front", FRONTS)
def test_a_product_with_a_zero_operand_still_clears_the_broadcast(front: str) -> None:
    """The same with ``relu(gate(x))`` (zero on removed channels): the product is zero, the group stays exact."""
    model, x = fused_roles.constant_gate_broadcast(torch.float64, "relu")
    randomize_(model, 0)
    result = check_exactness(ExportOnly(model) if front == "export" else model, x)
    assert _group_of(result.graph, "gate.weight").exact
    assert result.groups_pruned == 2 and result.max_abs_diff <= TOL * (1 + result.output_scale)


@pytest.mark.parametrize("front", FRONTS)
@pytest.mark.parametrize(("name", "tensor", "reason"), [
    ("split_by_size_roles", "fused.weight", "unequal or hard-coded sizes [10, 6]"),
    ("bias_after_reshape", "a.weight", "it is ambiguous which one shrinks"),
    ("interleaved_qkv", "attn.0.qkv.weight", "no op rule for unbind"),
    ("partial_rotary", "attn.0.q.weight", ("mixes or slices dims", "hard-codes the size 2")),
])
def test_refused_roles_say_why(name: str, tensor: str, reason: str | tuple[str, str], front: str) -> None:
    result = _oracle(name, front)
    group = _group_of(result.graph, tensor)
    assert not group.prunable
    assert (reason if isinstance(reason, str) else reason[FRONTS.index(front)]) in group.blocked[0]


@pytest.mark.parametrize("front", FRONTS)
def test_one_module_at_two_call_sites_refuses_different_kept_biases(front: str) -> None:
    """With the biases kept, the shared module's removed inputs carry a different constant at each call."""
    with pytest.raises(InexactPruneError, match="called at 2 places"):
        _oracle("shared_across_roles", front, keep_bias=True)
