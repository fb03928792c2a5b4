"""The Sparsifier under DistributedDataParallel: 2 CPU processes (gloo) against one process with the
same global batch. Thresholds and masks agree across ranks and with the single process; prune() on
every rank gives identical models; the re-wrapped DDP model trains."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from sparsify import GMPConfig, Sparsifier, SparsifyError, STRConfig
from sparsify.distributed import check_synchronized, prune_and_rewrap, sparsity_state

CONFIGS = {
    "bn_gamma+str": ("bn_gamma", STRConfig(s_init=0.0)),
    "filter_norm+str": ("filter_norm", STRConfig(s_init=0.25)),
    "bn_gamma+gmp": ("bn_gamma", GMPConfig(sparsity=0.5, start_step=0, end_step=4, update_every=1)),
    "filter_norm+gmp": ("filter_norm", GMPConfig(sparsity=0.5, start_step=0, end_step=4, update_every=1)),
}
STEPS, GLOBAL_BATCH = 5, 8


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.05, 1.0)
                m.bias.uniform_(-0.2, 0.2)
    return model


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(STEPS + 1, GLOBAL_BATCH, 3, 6, 6, generator=g), torch.randint(0, 4, (STEPS + 1, GLOBAL_BATCH),
                                                                                      generator=g)


def _frozen_bn(model: nn.Module) -> None:
    """Training mode with BatchNorm in eval mode: per-sample outputs, so the DDP gradient average
    equals the global-batch gradient (BN batch statistics would differ per rank; see sparsify.distributed)."""
    model.train()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()


def run(name: str, rank: int, world: int) -> dict[str, Any]:
    adapter, policy = CONFIGS[name]
    model = _model()
    xs, ys = _data()
    sp = Sparsifier(model, xs[0, :2], adapter=adapter, policy=policy)
    net = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    opt = torch.optim.SGD(net.parameters(), lr=0.2, momentum=0.9)
    shard = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
    for step in range(STEPS):
        _frozen_bn(model)
        loss = nn.functional.cross_entropy(net(xs[step, shard]), ys[step, shard])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sp.step()
    out: dict[str, Any] = {"state": {k: v.clone() for k, v in sparsity_state(sp).items()},
                           "zeros": {k: v.tolist() for k, v in sp.zero_structures().items()}}
    out["sync"] = check_synchronized(sp, include_weights=True)
    wrap = (lambda m: nn.parallel.DistributedDataParallel(m)) if world > 1 else (lambda m: m)
    result, net, opt = prune_and_rewrap(sp, opt, wrap)
    out["widths"] = result.widths
    out["pruned"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    _frozen_bn(model)  # the re-wrapped model trains a step with the same (sliced) optimizer
    loss = nn.functional.cross_entropy(net(xs[STEPS, shard]), ys[STEPS, shard])
    opt.zero_grad()
    loss.backward()
    opt.step()
    out["after_step"] = {k: v.detach().clone() for k, v in model.named_parameters()}
    return out


def _worker(rank: int, world: int, rendezvous: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=world)
    try:
        results = {name: run(name, rank, world) for name in CONFIGS}
        sp = Sparsifier(_model(), torch.randn(2, 3, 6, 6), adapter="filter_norm", policy="gmp")
        if rank == 1:  # one rank's mask drifts: every rank must notice
            next(iter(sparsity_state(sp).values())).fill_(0.0)
        try:
            check_synchronized(sp)
            results["mismatch"] = "not detected"
        except SparsifyError as exc:
            results["mismatch"] = str(exc)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


def test_ddp_matches_one_process_with_the_global_batch(tmp_path: Path) -> None:
    workers = mp.start_processes(_worker, args=(2, f"file://{tmp_path / 'rendezvous'}", str(tmp_path)), nprocs=2,
                                 join=False, start_method="spawn")
    singles = {name: run(name, 0, 1) for name in CONFIGS}  # while the workers start
    while not workers.join():
        pass
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert all("differs across the 2 ranks" in r["mismatch"] for r in ranks), [r["mismatch"] for r in ranks]
    for name, single in singles.items():
        r0, r1 = ranks[0][name], ranks[1][name]
        assert r0["sync"]["world_size"] == 2 and r0["sync"]["digest"] == r1["sync"]["digest"], name
        for key, value in r0["state"].items():  # thresholds and masks: identical across ranks
            assert torch.equal(value, r1["state"][key]), (name, key)
            torch.testing.assert_close(value, single["state"][key], rtol=0, atol=1e-6)
        assert r0["zeros"] == r1["zeros"] == single["zeros"], name
        assert any(len(z) for z in single["zeros"].values()), f"{name}: the policy should have zeroed something"
        assert r0["widths"] == r1["widths"] == single["widths"], name
        for key, value in r0["pruned"].items():  # prune() on each rank: identical pruned models
            assert torch.equal(value, r1["pruned"][key]), (name, key)
            torch.testing.assert_close(value, single["pruned"][key], rtol=0, atol=1e-5)
        assert any(not torch.equal(v, r0["pruned"][k]) for k, v in r0["after_step"].items()), name
        for key, value in r0["after_step"].items():  # the re-wrapped DDP trained a step, in sync
            assert torch.equal(value, r1["after_step"][key]), (name, key)
            torch.testing.assert_close(value, single["after_step"][key], rtol=0, atol=1e-5)


def test_sparsifier_refuses_a_ddp_wrapped_model(tmp_path: Path) -> None:
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rdv'}", rank=0, world_size=1)
    try:
        model = _model()
        with pytest.raises(SparsifyError, match="plain model"):
            Sparsifier(nn.parallel.DistributedDataParallel(model), torch.randn(2, 3, 6, 6))
        sp = Sparsifier(model, torch.randn(2, 3, 6, 6), adapter="bn_gamma", policy="str")
        assert check_synchronized(sp)["world_size"] == 1
    finally:
        dist.destroy_process_group()
