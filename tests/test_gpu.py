"""CUDA: graphs, surgery and the Sparsifier run where the model lives (``pytest -m gpu``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sparsify import GMPConfig, Sparsifier, STRConfig
from sparsify.testing.oracle import check_exactness, randomize_

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _resnet18_spread_gamma(tv) -> torch.nn.Module:
    """A CUDA resnet18 (seed 0) whose BN γ are spread over [0.05, 1) as after some training."""
    torch.manual_seed(0)
    model = tv.models.resnet18(num_classes=10).cuda()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.05, 1.0)
    return model


def _all_on_cuda(model: torch.nn.Module) -> bool:
    return all(t.is_cuda for t in [*model.parameters(), *model.buffers()])


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small", "densenet121"])
def test_oracle_on_cuda(tv, name: str) -> None:
    model = randomize_(tv.models.get_model(name)).double().cuda()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64, device="cuda")
    result = check_exactness(model, x)
    assert result.groups_pruned > 0
    assert result.max_abs_diff <= 1e-9 * (1 + result.output_scale)
    assert _all_on_cuda(model)


@pytest.mark.parametrize("policy", [STRConfig(s_init=-1.0, threshold_decay=2.0),
                                    GMPConfig(sparsity=0.5, end_step=6, update_every=2)], ids=["str", "gmp"])
def test_sparsifier_on_cuda(tv, policy, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # exact comparisons need plain fp32
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    model = _resnet18_spread_gamma(tv)
    x = torch.randn(16, 3, 32, 32, device="cuda")
    y = torch.randint(0, 10, (16,), device="cuda")
    sp = Sparsifier(model, x[:2], "bn_gamma", policy)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    for _ in range(8):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        sp.step()
    assert sp.report().channel_sparsity > 0
    model.eval()
    with torch.no_grad():
        soft = model(x)
    result = sp.prune(optimizer=opt)
    assert result.params_after < result.params_before
    with torch.no_grad():
        assert torch.allclose(model(x), soft, atol=1e-4, rtol=1e-3)
    assert _all_on_cuda(model)
    model.train()
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()


@pytest.mark.parametrize("arm", ["dense", "str_bn", "gmp_erk", "torch_pruning"])
def test_cifar_harness_graphed_steps_equal_eager(arm: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The benchmark's CUDA-graphed step (batched STR transform captured inside the graph) trains
    exactly like the eager step (TF32 off and deterministic convolutions: with TF32, the two differ by
    ~1e-4 after 5 steps)."""
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    from benchmarks.cifar_lib.arms import ARMS
    from benchmarks.cifar_lib.models import build
    from benchmarks.cifar_lib.train import Recipe, Trainer

    class Batches:
        batch, world = 64, 1

        def __init__(self) -> None:
            g = torch.Generator(device="cuda").manual_seed(0)
            self.data = [(torch.randn(64, 3, 32, 32, device="cuda", generator=g).contiguous(
                memory_format=torch.channels_last), torch.randint(0, 10, (64,), device="cuda", generator=g))
                for _ in range(5)]

        def __len__(self) -> int:
            return len(self.data)

        def __iter__(self):
            return iter(self.data)

    losses = []
    for graphs in (False, True):
        torch.manual_seed(0)
        model = build("resnet20").cuda().to(memory_format=torch.channels_last)
        a = ARMS[arm](2.0, 5, 1, 0)
        loader = Batches()
        a.setup(model, loader.data[0][0][:2])
        trainer = Trainer(model, Recipe(epochs=1, batch=64), torch.device("cuda"), bf16=False, graphs=graphs,
                          cache=a.cache)
        trainer.rebuild(loader.data[0][0])
        _, stats = trainer.train_epoch(loader, 0, 5, a)
        losses.append((stats["loss"], [p.detach().clone() for p in model.parameters()]))
    assert losses[0][0] == pytest.approx(losses[1][0], rel=1e-4)
    assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(losses[0][1], losses[1][1], strict=True))


def test_latency_model_times_layers_on_cuda() -> None:
    """The latency budget's model measures on the GPU: a full keep costs its dense estimate, a plan with
    half of every prunable group's channels gets a finite positive estimate."""
    import numpy as np

    from sparsify import build_channel_graph
    from sparsify._compat import import_torchvision
    from sparsify.measure.latency_model import LatencyModel

    model = import_torchvision().models.resnet18(num_classes=10).cuda().eval()
    cg = build_channel_graph(model, torch.randn(2, 3, 64, 64, device="cuda"))
    lm = LatencyModel(cg, batch=64, device="cuda", step=8, grid_points=2, iters=3, warmup=1)
    full = {g.id: np.ones(g.width, dtype=bool) for g in cg.prunable_groups()}
    half = {gid: np.arange(len(k)) < max(8, len(k) // 2) for gid, k in full.items()}
    assert lm.after(full) == pytest.approx(lm.total, rel=1e-6)
    # no ordering between the two: at this size layers are launch-bound and half widths need not be faster
    assert lm.measured > 0 and 0 < lm.after(half) < float("inf") and 0 < lm.total < float("inf")


def test_deferred_str_update_never_waits_for_the_gpu(tv) -> None:
    """control_lag: the reading step copies to pinned memory without a sync (sync debug mode would raise),
    and the update applied lag steps later equals the immediate one (thresholds unmoved meanwhile)."""
    def make(lag: int) -> Sparsifier:
        model = _resnet18_spread_gamma(tv)
        cfg = STRConfig(s_init=-6.0, threshold_fn="exp", target=0.5, target_start_step=0, target_end_step=10,
                        control_every=10, control_lag=lag)
        return Sparsifier(model, torch.randn(2, 3, 32, 32, device="cuda"), "bn_gamma", cfg)

    now, later = make(0), make(3)
    for _ in range(9):
        now.step()
        later.step()
    now.step()
    torch.cuda.set_sync_debug_mode("error")
    try:
        later.step()  # step 10: reads, must not synchronize
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for _ in range(3):
        later.step()
    s_now = torch.cat([t.s.detach() for t in now.policy.transforms])
    s_later = torch.cat([t.s.detach() for t in later.policy.transforms])
    assert s_later.is_cuda and torch.allclose(s_later, s_now, rtol=1e-6, atol=0)
    assert later.policy.measured_sparsity() == pytest.approx(now.policy.measured_sparsity(), abs=1e-12)
    assert now.policy.measured_sparsity() >= 0.5
