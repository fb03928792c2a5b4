"""deploy(): BatchNorm folded into convs found on the traced graph, same outputs (float64, 1e-10)."""

from __future__ import annotations

from types import ModuleType

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsify import GMPConfig, Sparsifier, SparsifyError, build_channel_graph, prune_channels
from sparsify.deploy import deploy, find_conv_bn_pairs, fold_batchnorm
from sparsify.testing.oracle import random_plan, randomize_, soft_zero_


def _bns(model: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _same(model: nn.Module, deployed: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x) - deployed(x.contiguous(memory_format=torch.channels_last))).abs().max())


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_deploy_folds_every_bn_and_keeps_outputs(tv: ModuleType, name: str) -> None:
    model = randomize_(getattr(tv.models, name)(num_classes=10)).double().eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    n_bn = _bns(model)
    deployed = deploy(model, x)
    assert _bns(deployed) == 0 and _bns(model) == n_bn  # a copy: the original is untouched
    assert _same(model, deployed, x) <= 1e-10
    conv = next(m for m in deployed.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)


def test_deploy_pruned_resnet50(tv: ModuleType) -> None:
    model = randomize_(tv.models.resnet50(num_classes=10)).double().eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    cg = build_channel_graph(model, x)
    plan = random_plan(cg, 0.5, seed=2)
    soft_zero_(model, cg.groups, plan)
    prune_channels(cg, plan)
    assert model.layer1[0].conv1.out_channels < 64
    deployed = deploy(model, x)
    assert _bns(deployed) == 0
    assert _same(model, deployed, x) <= 1e-10
    # the pruned widths don't stop the activation fusion (16 conv+add+ReLU, 33 conv+ReLU, as when dense)
    kinds = [type(m).__name__ for m in deployed.modules()]
    assert kinds.count("ConvAddReLU") == 16 and kinds.count("ConvReLU") == 33


def test_deploy_after_sparsifier_prune() -> None:
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 8, 3),
                          nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))
    randomize_(model)
    x = torch.randn(2, 3, 8, 8)
    sp = Sparsifier(model, x, "filter_norm", GMPConfig(sparsity=0.5, start_step=0, end_step=1, update_every=1))
    with pytest.raises(SparsifyError, match="prune"):  # still parametrized: refuse
        deploy(model, x)
    sp.step()
    sp.prune()
    deployed = deploy(model, x, channels_last=False)
    assert _bns(deployed) == 0
    with torch.no_grad():
        assert torch.allclose(model.eval()(x), deployed(x), atol=1e-5, rtol=1e-5)


class SharedConv(nn.Module):
    """One conv applied twice, a BN after its second use; another conv whose output also feeds a skip."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 1)
        self.bn2 = nn.BatchNorm2d(8)
        self.conv3 = nn.Conv2d(8, 8, 1)
        self.bn3 = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.conv(x))
        y = self.bn(self.conv(y))  # conv used twice: folding bn would change the first call
        z = self.conv2(y)
        y = self.bn2(z) + z  # conv2's output is also used outside bn2
        return self.bn3(self.conv3(y))  # the only foldable pair


def test_conv_used_twice_or_shared_output_is_not_folded() -> None:
    model = randomize_(SharedConv()).double().eval()
    x = torch.randn(2, 8, 6, 6, dtype=torch.float64)
    pairs, refused = find_conv_bn_pairs(model, x)
    assert pairs == [("conv3", "bn3")]
    assert "more than once" in refused["bn"] and "also used outside" in refused["bn2"]
    deployed = deploy(model, x)
    assert isinstance(deployed.bn, nn.BatchNorm2d) and isinstance(deployed.bn2, nn.BatchNorm2d)
    assert isinstance(deployed.bn3, nn.Identity)
    assert _same(model, deployed, x) <= 1e-10


def test_bn_without_running_stats_is_not_folded() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, track_running_stats=False)).double()
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    assert fold_batchnorm(model, x) == []
    _, refused = find_conv_bn_pairs(model, x)
    assert "running statistics" in refused["1"]


def test_deploy_dtype_and_bad_arguments(tv: ModuleType) -> None:
    model = tv.models.resnet18(num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    wide = deploy(model, x, dtype=torch.float64, channels_last=False)
    assert next(wide.parameters()).dtype == torch.float64
    with pytest.raises(SparsifyError, match="floating-point"):
        deploy(model, x, dtype=torch.int8)
    with pytest.raises(SparsifyError, match=r"nn\.Module"):
        deploy(lambda t: t, x)  # type: ignore[arg-type]
