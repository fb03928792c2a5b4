"""The ``taylor`` adapter: LLM-Pruner's Taylor scores over whole coupled groups, on a tiny LLaMA."""

from __future__ import annotations

import copy

import pytest
import torch

from sparsify import GMPConfig, Sparsifier, SparsifyError, build_channel_graph
from sparsify.adapters.taylor import TaylorAdapter, TaylorConfig
from sparsify.oneshot import apply_plan, make_plan

pytest.importorskip("transformers")
from sparsify.testing.hf_models import tiny_causal_lm


def _batches(n: int = 3) -> list[dict[str, torch.Tensor]]:
    ids = [torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(10 + i)) for i in range(n)]
    return [{"input_ids": i, "labels": i} for i in ids]


def _mean_grads(model: torch.nn.Module, batches: list[dict]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Mean gradient and mean squared gradient per parameter, by plain autograd."""
    total: dict[str, torch.Tensor] = {}
    square: dict[str, torch.Tensor] = {}
    for b in batches:
        model.zero_grad(set_to_none=True)
        model(**b).loss.backward()
        for n, p in model.named_parameters():
            if p.grad is None:
                continue
            total[n] = total.get(n, 0) + p.grad / len(batches)
            square[n] = square.get(n, 0) + p.grad.pow(2) / len(batches)
    model.zero_grad(set_to_none=True)
    return total, square


@pytest.mark.parametrize(("order", "granularity"), [("first", "element"), ("second_diag", "structure")])
def test_scores_sum_over_every_member_and_calibration_leaves_the_model_alone(order: str, granularity: str) -> None:
    model, x = tiny_causal_lm("llama")
    model.train()
    model.model.embed_tokens.weight.requires_grad_(False)
    before = copy.deepcopy(model.state_dict())
    adapter = TaylorAdapter(TaylorConfig(order=order, granularity=granularity))
    vectors = adapter.vectors(build_channel_graph(model, x), calibrate=False)
    adapter.calibrate(model, _batches())
    # untouched: weights, gradients, requires_grad, train mode
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert not model.model.embed_tokens.weight.requires_grad and model.training
    g, g2 = _mean_grads(copy.deepcopy(model).eval(), _batches())
    mlp = model.model.layers[1].mlp
    name = "model.layers.1.mlp."

    def s(proj: str, dim: int) -> torch.Tensor:
        w = getattr(mlp, proj).weight.detach()
        sal = g[name + proj + ".weight"] * w
        if order == "second_diag":
            sal = sal - 0.5 * w.pow(2) * g2[name + proj + ".weight"]
        other = 1 - dim
        return sal.abs().sum(other) if granularity == "element" else sal.sum(other)

    expected = s("gate_proj", 0) + s("up_proj", 0) + s("down_proj", 1)  # the structure owns rows and a column
    expected = expected if granularity == "element" else expected.abs()
    v = next(v for v in vectors if v.name.startswith(name))
    torch.testing.assert_close(v.raw(), expected, rtol=1e-7, atol=1e-12)
    head = next(v for v in vectors if v.group.kind == "kv_group")
    assert head.raw().shape == (2,) and bool((head.raw() > 0).all())


def test_one_shot_and_gmp_prune_exactly_what_is_zeroed() -> None:
    model, x = tiny_causal_lm("llama")
    plan = make_plan(model, x, 0.5, unit="channels", kinds={"channel"})
    pruned = copy.deepcopy(model)
    result = apply_plan(pruned, x, plan, importance="taylor", calibration=_batches())
    soft = copy.deepcopy(model)  # zero the removed neurons' producing rows: the same function
    for group_name, removed in result.removed.items():
        mlp = soft.get_submodule(group_name.split(" ")[0].rsplit(".", 1)[0])
        with torch.no_grad():
            mlp.gate_proj.weight[torch.as_tensor(removed)] = 0
    with torch.no_grad():
        assert (pruned(**x).logits - soft(**x).logits).abs().max().item() <= 1e-10
    assert pruned.model.layers[0].mlp.down_proj.in_features == 64
    # not the filter-norm choice: the scores read the gradients
    by_norm = copy.deepcopy(model)
    other = apply_plan(by_norm, x, plan, importance="filter_norm")
    assert any(set(other.removed[k].tolist()) != set(result.removed[k].tolist()) for k in other.removed)
    # the Sparsifier with gmp, reading the gradients of the user's backward pass
    model(**_batches(1)[0]).loss.backward()
    sp = Sparsifier(model, x, adapter=TaylorConfig(), policy=GMPConfig(sparsity=0.5, end_step=1))
    model.zero_grad(set_to_none=True)
    assert sp.adapter.stats.samples == 1
    sp.step()
    with torch.no_grad():
        masked = model(**x).logits
    sp.prune()
    with torch.no_grad():
        assert (model(**x).logits - masked).abs().max().item() <= 1e-10


def test_misuse_is_refused_clearly() -> None:
    model, x = tiny_causal_lm("llama")
    adapter = TaylorAdapter(TaylorConfig())
    vectors = adapter.vectors(build_channel_graph(model, x), calibrate=False)
    with pytest.raises(SparsifyError, match="no gradients yet"):
        vectors[0].raw()
    with pytest.raises(SparsifyError, match="loss_fn"):  # no labels, and the model returns no loss
        adapter.calibrate(model, [x])
    assert all(p.grad is None for p in model.parameters())  # restored after the failure
    adapter.calibrate(model, [x], loss_fn=lambda out, batch: out.logits.logsumexp(-1).mean())
    assert adapter.calibrated
    model(**_batches(1)[0]).loss.backward()  # gradients present: only the policy is wrong
    with pytest.raises(SparsifyError, match=r"'taylor'.*gmp"):
        Sparsifier(model, x, adapter=TaylorConfig(), policy="str")
