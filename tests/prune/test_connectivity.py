"""The vectorised connectivity rule equals the plain one (a group or member layer never emptied)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from sparsify import Sparsifier
from sparsify.graph.channel_graph import ChannelGroup
from sparsify.prune.select import Connectivity, protect_members


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(3, 5, 3, padding=1)
        self.bn = nn.BatchNorm2d(11)
        self.c = nn.Conv2d(11, 8, 1)
        self.bnc = nn.BatchNorm2d(8)
        self.d = nn.Conv2d(8, 8, 3, padding=1)
        self.bnd = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn(torch.cat([self.a(x), self.b(x)], 1)))  # a concat: two member layers
        y = torch.relu(self.bnc(self.c(y)))
        y = y + self.bnd(self.d(y))  # a residual
        return self.head(y.mean((2, 3)))


def _plain(groups: list[ChannelGroup], keep: dict[int, np.ndarray], magnitude) -> dict[int, np.ndarray]:
    out = {}
    for g in groups:
        gid = g.id
        k = keep[gid].copy()
        if not k.any():
            k[int(np.argmax(magnitude(gid)))] = True
        removed, _ = protect_members(g, np.flatnonzero(~k), magnitude(gid))
        k[:] = True
        k[removed] = False
        out[gid] = k
    return out


def test_vectorised_rule_equals_the_plain_one() -> None:
    torch.manual_seed(0)
    sp = Sparsifier(Net(), torch.randn(2, 3, 8, 8), "bn_gamma", "gmp")
    groups = [g.group for g in sp.groups]
    rng = np.random.default_rng(0)
    magnitudes = {g.id: rng.random(g.width) for g in groups}
    rule = Connectivity(groups)
    changed_somewhere = 0
    for trial in range(200):
        p = [0.0, 0.5, 0.9, 1.0][trial % 4]
        keep = {g.id: rng.random(g.width) >= p for g in groups}
        got, changed = rule.apply(keep, magnitudes.__getitem__)
        want = _plain(groups, keep, magnitudes.__getitem__)
        assert all(np.array_equal(got[k], want[k]) for k in want)
        assert all(got[k].any() for k in got)
        changed_somewhere += bool(changed)
    assert changed_somewhere > 50  # the rule was exercised (emptied groups and emptied concat branches)
