"""sparsify.deploy.stem: a stride-2 conv as a stride-1 conv on the space-to-depth input, exactly."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from sparsify._compat import import_torchvision
from sparsify.deploy.stem import space_to_depth_stems_
from sparsify.nn import SpaceToDepth, SpaceToDepthConv2d


@pytest.mark.parametrize(("cin", "k", "p", "size", "bias"), [
    (3, 7, 3, 224, False), (3, 3, 1, 224, True), (3, 7, 3, 33, True), (1, 5, 0, 20, False), (4, 3, 2, 31, True),
    (3, 3, 0, 17, False),
])
def test_space_to_depth_conv_equals_strided_conv(cin: int, k: int, p: int, size: int, bias: bool) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(cin, 16, k, stride=2, padding=p, bias=bias).double()
    x = torch.randn(2, cin, size, size + 1, dtype=torch.float64)
    s2d = SpaceToDepthConv2d(conv)
    assert s2d.conv.weight.shape[1] % 8 == 0 and s2d.conv.weight.shape[2:] == ((k + 1) // 2,) * 2
    torch.testing.assert_close(s2d(x), conv(x), rtol=0, atol=1e-12)
    cl = copy.deepcopy(s2d).to(memory_format=torch.channels_last)
    torch.testing.assert_close(cl(x.contiguous(memory_format=torch.channels_last)), conv(x), rtol=0, atol=1e-12)


def test_space_to_depth_stems_swaps_only_the_stem() -> None:
    tv = import_torchvision()
    torch.manual_seed(0)
    for name, expected in (("resnet18", ["conv1"]), ("mobilenet_v2", ["features.0.0"])):
        model = getattr(tv.models, name)(num_classes=10).eval().double()
        x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
        with torch.no_grad():
            before = model(x)
            assert space_to_depth_stems_(model) == expected
            after = model(x)
        assert isinstance(model.get_submodule(expected[0]), SpaceToDepthConv2d)
        torch.testing.assert_close(after, before, rtol=0, atol=1e-10)


def test_refuses_ineligible_convs() -> None:
    with pytest.raises(ValueError, match="stride 2"):
        SpaceToDepthConv2d(nn.Conv2d(3, 8, 3, stride=1))
    model = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1, dilation=2), nn.Conv2d(8, 8, 3, stride=2),
                          nn.Conv2d(8, 8, 4, stride=2))
    assert space_to_depth_stems_(model, max_in_channels=8) == ["1"]  # dilated; even kernel


def test_deploy_with_space_to_depth_stem_keeps_outputs() -> None:
    from sparsify.deploy import deploy

    tv = import_torchvision()
    torch.manual_seed(0)
    model = tv.models.resnet18(num_classes=10).eval().double()
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    deployed = deploy(model, x, space_to_depth_stem=True, channels_last=False)
    assert sum(isinstance(m, SpaceToDepth) for m in deployed.modules()) == 1
    assert "conv1.conv" in [f.conv for f in deployed.sparsify_fusions]  # the stem's ReLU is still fused
    with torch.no_grad():
        torch.testing.assert_close(deployed(x), model(x), rtol=0, atol=1e-10)
