"""Bad input gives a clear error and leaves the model untouched; odd but valid input just works."""

from __future__ import annotations

import copy

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from sparsify import GMPConfig, Sparsifier, SparsifyError, build_channel_graph, prune_channels
from sparsify.errors import TraceError
from sparsify.testing.oracle import random_plan


def _net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 1),
                         nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(model: nn.Module, snapshot: dict[str, torch.Tensor]) -> bool:
    state = model.state_dict()
    return state.keys() == snapshot.keys() and all(torch.equal(state[k], snapshot[k]) for k in state)


X = torch.randn(2, 3, 8, 8)


def test_nan_importance_is_reported_not_silently_ranked() -> None:
    model = _net()
    sp = Sparsifier(model, X, "bn_gamma", GMPConfig(sparsity=0.5, end_step=1, update_every=1))
    with torch.no_grad():
        model[1].parametrizations.weight.original[3] = float("nan")
    with pytest.raises(SparsifyError, match="NaN/inf"):
        sp.step()


def test_unknown_adapter_kind_is_refused_before_touching_the_model() -> None:
    model = _net()
    before = _snapshot(model)
    with pytest.raises(ValidationError, match=r"unknown adapter kind 'bn_gama'.*bn_gamma"):
        Sparsifier(model, X, "bn_gama", "str")
    assert _same(model, before) and not any("parametrizations" in n for n, _ in model.named_parameters())


def test_parameters_on_another_device_than_the_inputs() -> None:
    model = _net()
    model[3].weight = nn.Parameter(torch.empty(8, 8, 1, 1, device="meta"))
    with pytest.raises(TraceError, match=r"several devices \(cpu, meta\).*model.to\(device\)"):
        build_channel_graph(model, X)


def test_frozen_parameters_stay_frozen_after_pruning() -> None:
    model = _net()
    for p in model[0].parameters():
        p.requires_grad_(False)
    cg = build_channel_graph(model, X)
    prune_channels(cg, random_plan(cg, 0.5))
    assert not model[0].weight.requires_grad and model[3].weight.requires_grad
    assert model[0].out_channels == 4


def test_pruning_an_already_pruned_model_works_with_a_new_graph() -> None:
    model = _net()
    cg = build_channel_graph(model, X)
    prune_channels(cg, random_plan(cg, 0.5))
    cg2 = build_channel_graph(model, X)
    prune_channels(cg2, random_plan(cg2, 0.5))
    assert model[0].out_channels == 2 and model(X).shape == (2, 3)


def test_a_policy_that_empties_a_group_keeps_one_structure() -> None:
    model = _net()
    sp = Sparsifier(model, X, "filter_norm", GMPConfig(sparsity=0.9, end_step=1, update_every=1))
    with torch.no_grad():  # force every mask of the first group to zero
        sp.step()
        for v in sp.groups[0].vectors:
            v.transform.mask.zero_()
    result = sp.prune()
    assert result.kept_to_stay_connected == [sp.groups[0].name]
    assert model(X).shape == (2, 3)


def test_example_input_of_the_wrong_rank() -> None:
    model = _net()
    before = _snapshot(model)
    with pytest.raises(TraceError, match="example_inputs"):
        build_channel_graph(model, torch.randn(3, 8, 8, 8, 8))
    assert _same(model, before)


def test_sparsifier_state_from_another_config_is_refused() -> None:
    a = Sparsifier(_net(), X, "bn_gamma", "str")
    b = Sparsifier(_net(), X, "bn_gamma", GMPConfig(sparsity=0.5))
    with pytest.raises(SparsifyError, match="different config"):
        b.load_state_dict(copy.deepcopy(a.state_dict()))
