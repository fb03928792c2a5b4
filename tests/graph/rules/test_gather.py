"""Selection by tensor indices (issue #21: 10 HF MoE families refused at ``no op rule for index.Tensor()``).

A Mixture-of-Experts layer in the shape of transformers 5's batched experts: the router's top-k picks
experts, ``w[expert_ids]`` gathers per-expert weights (parameters of shape (experts, out, in)). The
expert dim is data-selected (a barrier naming topk/index); the experts' inner neurons stay one exact
group, pruned in every expert at once."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from sparsify import build_channel_graph
from sparsify.testing.contracts import TOLERANCE
from sparsify.testing.gather_models import (
    BatchedExperts,
    GatherChannels,
    RepeatAndTranspose,
    TransposedOutput,
    gather_tokens,
    index_buffer_table,
    index_select_tokens,
)
from sparsify.testing.oracle import check_exactness, randomize_
from sparsify.testing.rule_models import Example, ExportOnly


@pytest.mark.parametrize("export", [False, True], ids=["fx", "export"])
def test_moe_experts_inner_neurons_are_exact_and_the_expert_dim_is_a_barrier(export: bool) -> None:
    torch.manual_seed(0)
    model = BatchedExperts().double()
    model = ExportOnly(model) if export else model
    inner = model.inner if export else model
    x = torch.randn(7, 5, dtype=torch.float64)
    cg = build_channel_graph(model, x)
    tensors = {g.id: {m.tensor.rpartition(".")[2] + f":{m.dim}" for m in g.members} for g in cg.groups}
    neurons = [g for g in cg.groups if {"gate_up:1", "down:2"} <= tensors[g.id]]
    assert len(neurons) == 1 and neurons[0].prunable and neurons[0].exact, [(g.name, g.why_not()) for g in neurons]
    experts = [g for g in cg.groups if "gate_up:0" in tensors[g.id]]
    assert experts and not any(g.prunable for g in experts)
    router = next(g for g in cg.groups if any(m.module.endswith("router") and m.role == "out" for m in g.members))
    assert not router.prunable and ("topk" in router.why_not() or "index" in router.why_not()), router.why_not()
    randomize_(model, 0)
    result = check_exactness(model, x, 0.5, 0)
    assert result.groups_pruned >= 1
    assert result.max_abs_diff <= TOLERANCE * (1 + result.output_scale)
    assert inner.gate_up.shape[:2] == (4, 6) and (inner.down.shape[0], inner.down.shape[2]) == (4, 3)


@pytest.mark.parametrize("builder", [gather_tokens, index_select_tokens], ids=["index", "index_select"])
def test_index_on_another_dim_keeps_the_channel_dim_exact(builder: Callable[..., Example]) -> None:
    model, (x, idx) = builder(torch.float64)
    cg = build_channel_graph(model, (x, idx))
    group = next(g for g in cg.groups if any(m.module == "a" and m.role == "out" for m in g.members))
    assert group.prunable and group.exact, group.why_not()
    randomize_(model, 0)
    result = check_exactness(model, (x, idx), 0.5, 0)
    assert result.groups_pruned == 1 and model.a.out_features == 3
    assert result.max_abs_diff <= TOLERANCE * (1 + result.output_scale)


@pytest.mark.parametrize("op", ["index", "index_select"])
def test_index_on_the_channel_dim_is_a_barrier(op: str) -> None:
    model = GatherChannels(op)
    cg = build_channel_graph(model, (torch.randn(2, 5), torch.tensor([5, 1, 1, 0, 2, 3])))
    group = next(g for g in cg.groups if any(m.module == "a" and m.role == "out" for m in g.members))
    assert not group.prunable and "tensor of indices" in group.why_not(), group.why_not()


@pytest.mark.parametrize("export", [False, True], ids=["fx", "export"])
def test_repeat_and_numpy_t_are_exact(export: bool) -> None:
    model = RepeatAndTranspose().double()
    model = ExportOnly(model) if export else model
    inner = model.inner if export else model
    x = torch.randn(4, 5, dtype=torch.float64)
    randomize_(model, 0)
    result = check_exactness(model, x, 0.5, 0)
    assert inner.a.out_features == 3 and inner.b.in_features == 6
    assert result.max_abs_diff <= TOLERANCE * (1 + result.output_scale)


def test_tensor_attribute_t_couples_its_dims_under_fx() -> None:
    """Regression: under fx ``x.T`` is ``getattr(x, "T")``, once read as a shape query, so a's channels
    stayed an exact group whose pruning changed the output's shape."""
    model = TransposedOutput().double()
    cg = build_channel_graph(model, torch.randn(4, 5, dtype=torch.float64))
    assert "shape_query" in cg.facts.rule_of.values()
    group = next(g for g in cg.groups if any(m.module == "a" and m.role == "out" for m in g.members))
    assert not group.prunable and "model output" in group.why_not(), group.why_not()


@pytest.mark.parametrize("export", [False, True], ids=["fx", "export"])
@pytest.mark.parametrize("op", ["index", "index_select"])
def test_an_index_buffer_s_dims_are_positions_not_channels(op: str, export: bool) -> None:
    """Issue #21, HF MaskFormer (Swin's relative-position index through view(-1)): the index buffer was an
    exact prunable group; pruning it shrank the gathered bias (silently wrong here, a size mismatch there)."""
    model, x = index_buffer_table(torch.float64, op)
    model = ExportOnly(model) if export else model
    cg = build_channel_graph(model, x)
    index_groups = [g for g in cg.groups if any(m.tensor.endswith("index") for m in g.members)]
    assert all(not g.prunable for g in index_groups), [(g.name, g.why_not()) for g in index_groups]
    assert all("index tensor" in g.why_not() for g in index_groups), [g.why_not() for g in index_groups]
    randomize_(model, 0)
    result = check_exactness(model, x, 0.5, 0)
    assert result.max_abs_diff <= TOLERANCE * (1 + result.output_scale)
