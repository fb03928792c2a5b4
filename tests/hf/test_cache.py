"""A decoder traced with use_cache on (sparsify.hf.cache): DynamicCache is a pytree node, the cache's
tensors are graph outputs, and the groups that do not reach the cache prune exactly."""

from __future__ import annotations

import pytest
import torch

from sparsify import build_channel_graph, prune_channels
from sparsify.testing.hf_models import tiny_causal_lm
from sparsify.testing.oracle import random_plan, randomize_, soft_zero_

pytest.importorskip("transformers")


def _flat(model: torch.nn.Module, inputs: dict) -> list[torch.Tensor]:
    with torch.no_grad():
        out = model(**inputs)
    return [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def test_llama_with_use_cache_on_traces_and_prunes_exactly() -> None:
    model, inputs = tiny_causal_lm("llama")
    model.config.use_cache = True
    randomize_(model)
    cg = build_channel_graph(model, inputs)  # registers the cache as a pytree node
    assert len(_flat(model, inputs)) == 1 + 2 * model.config.num_hidden_layers  # logits + keys and values
    kv = [g for g in cg.groups if g.kind == "kv_group"]
    assert kv and all("model output" in g.blocked for g in kv)  # the cache is returned: its heads stay
    plan = random_plan(cg, 0.5, seed=0)
    assert plan  # the MLP channels
    soft_zero_(model, cg.groups, plan)
    reference = _flat(model, inputs)
    prune_channels(cg, plan)
    pruned = _flat(model, inputs)
    assert len(pruned) == len(reference)
    for a, b in zip(reference, pruned, strict=True):  # logits and every cache tensor
        assert a.shape == b.shape and torch.allclose(a, b, atol=1e-9, rtol=0)


def test_an_empty_one_dim_input_of_cat_is_skipped_not_a_failed_rule() -> None:
    """torch.cat drops a 1-D empty input (an empty cache layer); the cat rule must not fail on it."""
    from sparsify.testing.rule_models import ExportOnly

    class CatEmpty(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = torch.nn.Linear(4, 6), torch.nn.Linear(6, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.cat([torch.tensor([], dtype=x.dtype), torch.relu(self.a(x))], dim=-2)
            return self.b(h)

    model = ExportOnly(CatEmpty()).double()
    cg = build_channel_graph(model, torch.randn(2, 5, 4, dtype=torch.float64))
    hidden = [g for g in cg.groups if g.width == 6]
    assert hidden and not any("failed" in r for g in hidden for r in g.blocked), [g.blocked for g in hidden]
    assert any(g.exact for g in cg.prunable_groups())
