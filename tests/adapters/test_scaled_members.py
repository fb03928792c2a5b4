"""A soft factor on a conv that feeds a BatchNorm goes on the BatchNorm only: pruning stays exact and the
kept conv rows keep their trained scale (baked-in factors shrank them, and under BatchNorm that raised
their effective learning rate by 1/f²)."""

from __future__ import annotations

import torch
from torch import nn

from sparsify import Sparsifier, STRConfig
from sparsify.adapters.scaled_members import normalized_producers
from sparsify.graph.channel_graph import build_channel_graph

X = torch.randn(4, 3, 10, 10)


def cnn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),  # conv → BN
                         nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),                    # no BN after it
                         nn.Conv2d(8, 6, 1), nn.BatchNorm2d(6, affine=False), nn.ReLU(),  # BN without γ/β
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4))


def rows(conv: nn.Conv2d) -> list[torch.Tensor]:
    return list(conv.weight.detach().flatten(1))


def test_only_convs_feeding_an_affine_batchnorm_are_left_to_it() -> None:
    cg = build_channel_graph(cnn().eval(), X)
    found = {g.name: normalized_producers(cg, g) for g in cg.prunable_groups()}
    assert found["0"] == {"0"} and found["3"] == set() and found["5"] == set()


def test_soft_filter_norm_prunes_exactly_and_keeps_the_rows_of_normalized_convs() -> None:
    model = cnn()
    with torch.no_grad():  # running statistics that are not the identity
        model.train()(X * 2 + 1)
    model.eval()
    before = {i: rows(model[i]) for i in (0, 3)}
    sp = Sparsifier(model, X, "filter_norm", STRConfig(s_init=0.25, granularity="group"))
    assert not hasattr(model[0], "parametrizations") and hasattr(model[1], "parametrizations")
    assert hasattr(model[3], "parametrizations")
    with torch.no_grad():
        soft = model(X)
    sp.prune()
    with torch.no_grad():
        assert torch.allclose(model(X), soft, atol=1e-5)
    assert 0 < model[0].out_channels < 8 and 0 < model[3].out_channels < 8  # some pruned, some kept
    # the conv feeding BN keeps its kept rows unscaled; the one without BN has its factor baked in
    assert all(any(torch.equal(r, b) for b in before[0]) for r in rows(model[0]))
    assert not any(any(torch.equal(r, b) for b in before[3]) for r in rows(model[3]))
