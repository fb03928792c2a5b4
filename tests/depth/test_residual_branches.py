"""Depth pruning of residual networks: which branches are found, and removal is exact where they output zero."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsify.depth import branch_importance, remove_residual_branches, residual_branches, untraced_modules
from sparsify.errors import SparsifyError
from sparsify.testing.depth_oracle import check_branch_removal
from sparsify.testing.oracle import check_exactness

torchvision = pytest.importorskip("torchvision")

# family → (expected branches, input size)
ZOO = {
    "resnet18": (8, 64), "resnet50": (16, 64), "mobilenet_v2": (10, 64), "convnext_tiny": (18, 64),
    "efficientnet_b0": (9, 64), "regnet_x_400mf": (18, 64), "swin_t": (24, 64), "mnasnet0_5": (10, 64),
    "mobilenet_v3_small": (6, 64), "resnext50_32x4d": (16, 64), "densenet121": (0, 64),
    "shufflenet_v2_x0_5": (0, 64),
}


def _vit() -> nn.Module:
    return torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=3, num_heads=2,
                                                hidden_dim=16, mlp_dim=32)


@pytest.mark.parametrize("family", sorted(ZOO))
def test_zoo_branches_and_exact_removal(family: str) -> None:
    expected, size = ZOO[family]
    torch.manual_seed(0)
    model = getattr(torchvision.models, family)().double().eval()
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    branches = residual_branches(model, x)
    assert len(branches) == expected
    assert untraced_modules(model, x) == []
    if branches:
        assert check_branch_removal(model, x, branches) <= 1e-9
        assert check_branch_removal(model, x, branches[1::2]) <= 1e-9


def test_vit_attention_and_mlp_branches() -> None:
    torch.manual_seed(0)
    model = _vit().double().eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    branches = residual_branches(model, x)
    assert [b.module for b in branches] == [f"encoder.layers.encoder_layer_{i}" for i in range(3) for _ in range(2)]
    assert "self_attention" in branches[0].layers and "mlp" in branches[1].layers
    assert check_branch_removal(model, x, branches) <= 1e-9
    pruned = copy.deepcopy(model)
    remove_residual_branches(pruned, branches)
    assert not [n for n, _ in pruned.named_parameters() if "encoder_layer" in n]  # every block's weights gone


def test_bottleneck_becomes_out_of_place_relu() -> None:
    model = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 64, 64)
    identity = [b for b in residual_branches(model, x) if b.module == "layer1.1"]
    remove_residual_branches(model, identity)
    block = model.get_submodule("layer1.1")
    assert isinstance(block, nn.ReLU) and block.inplace is False
    downsample = [b for b in residual_branches(model, x) if b.module == "layer2.0"]
    assert set(downsample[0].layers) == {"conv1", "bn1", "conv2", "bn2"}  # the downsample path is the skip


class _Block(nn.Module):
    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x + self.conv(x))


class _DenseOfResidual(nn.Module):
    """The block's input is read after the block: an in-place ReLU on it would corrupt the concat."""

    def __init__(self) -> None:
        super().__init__()
        self.block = _Block()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.block(x)], 1)


def test_activation_left_reading_the_input_runs_out_of_place() -> None:
    torch.manual_seed(0)
    model = _DenseOfResidual().double()
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    branches = residual_branches(model, x)
    assert len(branches) == 1
    assert check_branch_removal(model, x, branches) == 0.0
    remove_residual_branches(model, branches)
    out = model(x)
    assert torch.equal(out[:, :4], x) and torch.equal(out[:, 4:], F.relu(x))


class _NotResidual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)
        self.pos = nn.Parameter(torch.zeros(1, 4, 1, 1))
        self.up = nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x) + self.b(x)  # two equal branches: neither is the skip
        y = y + self.pos  # a parameter alone is not a branch
        z = y.mean((2, 3), keepdim=True)
        y = z + self.up(y)  # broadcasts: removing up(y) changes the shape
        return y + F.relu_(y)  # the second operand writes into y in place, the first is read twice


class _Wrapper(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) + x  # the root's own addition: not offered (the root can't be swapped)


def test_not_residual_branches_are_not_offered() -> None:
    model = _Wrapper(_NotResidual())
    assert residual_branches(model, torch.randn(2, 4, 5, 5)) == []


def test_root_additions_are_not_searched() -> None:
    model = _Wrapper(nn.Conv2d(4, 4, 1))
    assert residual_branches(model, torch.randn(1, 4, 3, 3)) == []


class _ValueDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return x + self.conv(x)
        return x


def test_untraceable_blocks_are_listed() -> None:
    model = nn.Sequential(_ValueDependent(), _Block())
    x = torch.randn(1, 4, 3, 3)
    assert [b.module for b in residual_branches(model, x)] == ["1"]
    assert untraced_modules(model, x) == ["0"]


def test_importance_is_zero_for_a_zero_branch_and_ranks_the_others() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(_Block(), _Block(), _Block())
    with torch.no_grad():
        model[0].conv.weight.zero_()
        model[0].conv.bias.zero_()
        model[2].conv.weight.mul_(10)
    x = torch.randn(2, 4, 6, 6)
    branches = residual_branches(model, x)
    scores = branch_importance(model, branches, [x, torch.randn(2, 4, 6, 6)])
    assert scores[0] == 0 and 0 < scores[1] < scores[2]
    assert model.training  # modes are put back


def test_bad_calls_leave_the_model_alone() -> None:
    model = nn.Sequential(_Block(), _Block())
    x = torch.randn(1, 4, 3, 3)
    branches = residual_branches(model, x)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(SparsifyError, match="repeat"):
        remove_residual_branches(model, [branches[0], branches[0]])
    with pytest.raises(SparsifyError, match="list of ResidualBranch"):
        remove_residual_branches(model, branches[0])  # type: ignore[arg-type]
    other = nn.Sequential(nn.Identity())
    with pytest.raises(SparsifyError, match="no submodule"):
        remove_residual_branches(other, branches[1:])
    bogus = [branches[0], type(branches[1])("1", "no_such_add", "conv", ("conv",))]
    with pytest.raises(SparsifyError, match="no residual addition"):
        remove_residual_branches(model, bogus)
    assert all(isinstance(m, _Block) for m in model)  # nothing installed: the first module was not replaced
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(SparsifyError, match="example inputs"):
        residual_branches(model, torch.randn(1, 3, 3, 3))


def test_shared_block_is_refused() -> None:
    block = _Block()
    model = nn.Sequential(block, block)
    branches = residual_branches(model, torch.randn(1, 4, 3, 3))
    with pytest.raises(SparsifyError, match="several names"):
        remove_residual_branches(model, branches)


def test_width_pruning_after_depth_pruning_is_exact() -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet18().double().eval()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    remove_residual_branches(model, residual_branches(model, x)[1::2])
    result = check_exactness(model, x)  # the channel oracle on the shallower network
    assert result.groups_pruned > 0 and result.max_abs_diff <= 1e-9 * max(result.output_scale, 1.0)


def test_a_model_in_training_mode_is_searched_and_left_as_it_was() -> None:
    model = torchvision.models.resnet18()  # training mode: BatchNorm would update its statistics
    x = torch.randn(2, 3, 64, 64)
    before = copy.deepcopy(model.state_dict())
    branches = residual_branches(model, x)
    branch_importance(model, branches, [x])
    assert len(branches) == 8 and model.training and all(m.training for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
