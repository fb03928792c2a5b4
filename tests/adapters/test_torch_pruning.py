"""The ``torch_pruning`` adapter: Torch-Pruning's criteria as importance vectors, exact under our pruner."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from torch import nn

from sparsify import GMPConfig, Sparsifier, SparsifyError, build_channel_graph, prune_channels
from sparsify.adapters import TorchPruningConfig
from sparsify.adapters.torch_pruning import TorchPruningAdapter
from sparsify.testing.models import concat_net, residual_cnn, se_net
from sparsify.testing.oracle import randomize_, soft_zero_

tp = pytest.importorskip("torch_pruning")
CRITERIA = ["magnitude", "taylor", "hessian", "lamp", "bn_scale"]


def _chain() -> tuple[nn.Module, torch.Tensor]:
    """A plain conv chain: conv-bn-relu ×3, pool, linear."""
    torch.manual_seed(0)
    layers = []
    for cin, cout in ((3, 6), (6, 8), (8, 5)):
        layers += [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
    model = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 4)).double()
    return randomize_(model).eval(), torch.randn(4, 3, 8, 8, dtype=torch.float64)  # eval: TP traces in eval mode


def _backward(model: nn.Module, x: torch.Tensor) -> None:
    model.zero_grad()
    model(x).square().mean().backward()


def _scored(model: nn.Module, x: torch.Tensor, config: TorchPruningConfig):
    """Graph, adapter, vectors; gradients present for the criteria that read them."""
    cg = build_channel_graph(model, x)
    adapter = TorchPruningAdapter(config)
    vectors = adapter.vectors(cg)
    if config.criterion == "hessian":
        for i in range(len(x)):  # per sample, as Torch-Pruning's OBD does
            _backward(model, x[i:i + 1])
            adapter.accumulate_grad(model)
    elif config.criterion == "taylor":
        _backward(model, x)
    return cg, adapter, vectors


def _lowest_half(cg, vectors) -> dict[int, np.ndarray]:
    """Per vector, its lower-scored half of structures; every member keeps one structure."""
    plan = {}
    for v in vectors:
        score = v.raw().detach().double().cpu().numpy()
        order = np.argsort(score, kind="stable")
        removed = set(order[: len(order) // 2].tolist())
        for m in v.group.members:
            mine = set(np.unique(m.structure_of).tolist())
            if mine and mine <= removed:
                removed.discard(max(mine, key=lambda s: score[s]))
        if removed:
            plan[v.group.id] = np.array(sorted(removed))
    return plan


@pytest.mark.parametrize("criterion", CRITERIA)
@pytest.mark.parametrize("builder", [residual_cnn, concat_net, se_net])
def test_exactness_oracle_on_the_lowest_scores(builder, criterion) -> None:
    """Soft-zero each vector's lowest-scored half (sparsify.testing.oracle), prune, compare in float64."""
    model, x = builder(torch.float64)
    randomize_(model).eval()
    cg, adapter, vectors = _scored(model, x, TorchPruningConfig(criterion=criterion))
    assert vectors, adapter.skipped
    if builder is residual_cnn:  # every group of the residual net maps onto Torch-Pruning's
        assert len(vectors) == len(cg.prunable_groups()) == 4
    adapter.refresh()
    plan = _lowest_half(cg, vectors)
    assert plan
    before = sum(p.numel() for p in model.parameters())
    soft_zero_(model, cg.groups, plan)
    with torch.no_grad():
        reference = model(x)
    prune_channels(cg, plan)
    with torch.no_grad():
        assert (model(x) - reference).abs().max().item() <= 1e-10
    assert sum(p.numel() for p in model.parameters()) < before


@pytest.mark.parametrize("criterion", CRITERIA)
def test_vector_equals_torch_prunings_own_importance(criterion) -> None:
    """On a plain conv chain every group's vector is TP's score of the TP group rooted at its conv."""
    model, x = _chain()
    inputs = x[:1] if criterion == "hessian" else x  # TP's accumulate_grad keeps only the last sample (a TP bug)
    _, adapter, vectors = _scored(model, inputs, TorchPruningConfig(criterion=criterion))
    assert [v.name for v in vectors] == ["0", "3", "6"], adapter.skipped  # the three convs' output channels
    ours = {v.name: v.raw().clone() for v in vectors}
    reference = copy.deepcopy(model)  # TP on its own, as its docs use it
    dg = tp.DependencyGraph().build_dependency(reference, example_inputs=x, verbose=False)
    importance = {"magnitude": tp.importance.GroupMagnitudeImportance, "taylor": tp.importance.GroupTaylorImportance,
                  "hessian": tp.importance.GroupHessianImportance, "lamp": tp.importance.LAMPImportance,
                  "bn_scale": tp.importance.BNScaleImportance}[criterion]()
    if criterion == "taylor":
        _backward(reference, x)
    if criterion == "hessian":
        importance.zero_grad()
        _backward(reference, x[:1])
        importance.accumulate_grad(reference)
    for v in vectors:
        layer = reference.get_submodule(v.name.split(" ")[0])
        fn = tp.prune_linear_out_channels if isinstance(layer, nn.Linear) else tp.prune_conv_out_channels
        theirs = importance(dg.get_pruning_group(layer, fn, idxs=list(range(v.group.width))))
        torch.testing.assert_close(ours[v.name], theirs.double(), rtol=1e-6, atol=1e-9)


def test_hessian_is_the_mean_squared_per_sample_gradient_and_leaves_grads_alone() -> None:
    model, x = _chain()
    _, adapter, vectors = _scored(model, x, TorchPruningConfig(criterion="hessian", normalizer=None))
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    adapter.refresh()
    assert all(torch.equal(p.grad, grads[n]) for n, p in model.named_parameters())  # .grad as the user left it
    squares = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for i in range(len(x)):
        _backward(model, x[i:i + 1])
        for n, p in model.named_parameters():
            squares[n] += p.grad.pow(2) / len(x)
    v = next(v for v in vectors if v.name == "3")  # conv 3: its outputs, BN 4, conv 6's inputs
    w3, w6, g4 = model[3].weight, model[6].weight, model[4].weight
    per_layer = [(w3.pow(2) * squares["3.weight"]).flatten(1).sum(1),
                 (g4.pow(2) * squares["4.weight"]),
                 (w6.pow(2) * squares["6.weight"]).transpose(0, 1).flatten(1).sum(1)]
    torch.testing.assert_close(v.raw(), torch.stack(per_layer).float().mean(0).double(), rtol=1e-5, atol=1e-12)


def test_skipped_groups_carry_reasons() -> None:
    from sparsify.testing.models import grouped_conv_net, text_mlp, transformer_block

    for builder, expect in ((grouped_conv_net, "couples"), (text_mlp, "no Conv/Linear produces")):
        model, x = builder(torch.float64)
        adapter = TorchPruningAdapter(TorchPruningConfig())
        cg = build_channel_graph(model, x)
        vectors = adapter.vectors(cg)
        assert len(vectors) + len(adapter.skipped) == len(cg.prunable_groups())
        assert adapter.skipped and all(why for why in adapter.skipped.values())
        assert any(expect in why for why in adapter.skipped.values()), adapter.skipped
    model, x = transformer_block(torch.float64)  # head groups, if prunable, are left out by kind
    cg = build_channel_graph(model, x)
    adapter = TorchPruningAdapter(TorchPruningConfig())
    adapter.vectors(cg)
    for g in cg.prunable_groups():
        if g.kind != "channel":
            assert "Torch-Pruning scores single channels" in adapter.skipped[g.name]
    mlp = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2)).double()  # bn_scale needs a BatchNorm
    adapter = TorchPruningAdapter(TorchPruningConfig(criterion="bn_scale"))
    assert adapter.vectors(build_channel_graph(mlp, torch.randn(2, 4, dtype=torch.float64))) == []
    assert "BatchNorm" in adapter.skipped["0"]


def test_gmp_sparsifier_trains_and_prunes_exactly() -> None:
    model, x = residual_cnn(torch.float64)
    randomize_(model)
    sp = Sparsifier(model, x, adapter=TorchPruningConfig(criterion="lamp"),
                    policy=GMPConfig(sparsity=0.5, start_step=0, end_step=4, update_every=1))
    assert model.training  # Torch-Pruning's tracing switches to eval; the adapter restores the modes
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(4):
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
        sp.step()
    v = sp.vectors[0]
    masked = v.transform.mask == 0
    assert masked.any() and (v.raw()[masked] > 0).all()  # scores read the stored weights, not the masked ones
    model.eval()
    with torch.no_grad():
        soft = model(x)
    result = sp.prune(optimizer=opt)
    with torch.no_grad():
        assert (model(x) - soft).abs().max().item() <= 1e-10
    assert result.params_after < result.params_before


def test_taylor_with_and_without_gradients() -> None:
    model, x = residual_cnn(torch.float64)
    randomize_(model)
    policy = GMPConfig(sparsity=0.5, start_step=0, end_step=2, update_every=1)
    with pytest.raises(SparsifyError, match=r"reads gradients.*loss\.backward"):
        Sparsifier(model, x, adapter=TorchPruningConfig(criterion="taylor"), policy=policy)
    model.zero_grad(set_to_none=True)
    model(x).square().mean().backward()
    sp = Sparsifier(model, x, adapter=TorchPruningConfig(criterion="taylor"), policy=policy)
    first = [v.raw().clone() for v in sp.vectors]
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(2):
        opt.zero_grad()
        model(x).square().mean().backward()
        sp.adapter.refresh()  # after backward, before zero_grad: the scores the next update reads
        opt.step()
        sp.step()
    assert any(not torch.equal(a, v.raw()) for a, v in zip(first, sp.vectors, strict=True))
    model.eval()
    with torch.no_grad():
        soft = model(x)
    sp.prune()
    with torch.no_grad():
        assert (model(x) - soft).abs().max().item() <= 1e-10


def test_one_shot_apply_plan_keeps_the_highest_taylor_scores() -> None:
    from sparsify import apply_plan, make_plan

    model, x = residual_cnn(torch.float64)
    randomize_(model).eval()
    config = TorchPruningConfig(criterion="taylor")
    _, _, vectors = _scored(model, x, config)  # gradients of one backward: what apply_plan's adapter reads
    scores = {v.name: v.raw().double().numpy() for v in vectors}
    plan = make_plan(model, x, 0.5, unit="channels")
    result = apply_plan(model, x, plan, importance=config)
    assert result.removed and set(result.removed) <= set(scores)
    for name, removed in result.removed.items():
        lowest = np.argsort(scores[name], kind="stable")[: len(removed)]
        assert sorted(removed.tolist()) == sorted(lowest.tolist()), name
    assert model.layer1.conv1.out_channels == 4


@pytest.mark.parametrize("policy", ["str", "slimming"])
def test_learned_policies_are_refused(policy) -> None:
    model, x = residual_cnn(torch.float64)
    with pytest.raises((SparsifyError, ValueError), match=r"gmp|parameter"):
        Sparsifier(model, x, adapter="torch_pruning", policy=policy)


def test_config_options() -> None:
    assert TorchPruningConfig().criterion == "magnitude"
    with pytest.raises(ValidationError, match="p is read by"):
        TorchPruningConfig(criterion="taylor", p=1)
    with pytest.raises(ValidationError, match="lamp"):
        TorchPruningConfig(criterion="lamp", normalizer="max")
    with pytest.raises(ValidationError, match="multivariable"):
        TorchPruningConfig(criterion="magnitude", multivariable=True)
    config = TorchPruningConfig(criterion="taylor", multivariable=True, normalizer=None)
    assert TorchPruningConfig.model_validate(config.model_dump()) == config
