"""Across torchvision's families: deploy (BN folded, conv+ReLU / conv+add+ReLU fused, residual biases merged)
keeps the outputs, and the latency model times the same fusions deploy makes (sparsify.measure.epilogue)."""

from __future__ import annotations

from types import ModuleType

import pytest
import torch

from sparsify.deploy import deploy
from sparsify.deploy.fusion import find_conv_activations
from sparsify.graph.channel_graph import build_channel_graph
from sparsify.measure.latency_model import LatencyModel
from sparsify.testing.oracle import randomize_

# one or two of every family (residual adds with and without downsample convs, concatenations, depthwise,
# squeeze-excitation, attention); the sizes are the smallest each model takes
MODELS = {"resnet18": 64, "resnet50": 64, "resnext50_32x4d": 64, "wide_resnet50_2": 64, "regnet_x_400mf": 64,
          "regnet_y_400mf": 64, "densenet121": 64, "googlenet": 64, "inception_v3": 299, "mobilenet_v2": 64,
          "mobilenet_v3_small": 64, "efficientnet_b0": 64, "mnasnet0_5": 64, "shufflenet_v2_x0_5": 64,
          "squeezenet1_1": 64, "convnext_tiny": 64, "vgg11_bn": 64, "alexnet": 64, "swin_t": 224,
          "maxvit_t": 224, "vit_b_16": 224}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(MODELS))
def test_deploy_keeps_outputs_and_the_latency_model_sees_its_fusions(tv: ModuleType, name: str) -> None:
    torch.manual_seed(0)
    model = randomize_(tv.models.get_model(name, num_classes=10)).eval()
    x = torch.randn(1, 3, MODELS[name], MODELS[name])
    deployed = deploy(model, x)
    with torch.no_grad():
        want, got = model(x), deployed(x)
    want, got = (want[0], got[0]) if isinstance(want, (tuple, list)) else (want, got)
    assert float((want - got).abs().max()) <= 1e-5 * (float(want.abs().max()) + 1e-6)
    fusions = deployed.sparsify_fusions
    lat = LatencyModel(build_channel_graph(model, x), step=8, latency_fn=lambda spec, i, o: 1.0 + 1e-4 * i * o)
    timed_add = {s.name.removesuffix(".weight") for s in lat.layers if s.add_relu}
    timed_merged = {s.name.removesuffix(".weight") for s in lat.layers if s.bias_merged}
    assert timed_add == {f.conv for f in fusions if f.add is not None}
    assert timed_merged == {f.bias_from for f in fusions if f.bias_from}
    # conv→ReLU(6): deploy fuses a subset of what the latency model times with its activation; the rest it
    # refuses for a stated reason (grouped convs, a ReLU inside a module called as a whole, …)
    timed_relu = {s.name.removesuffix(".weight"): s.relu_cap for s in lat.layers if s.relu}
    fused_relu = {f.conv: f.max_value for f in fusions if f.add is None}
    assert all(timed_relu.get(conv, "missing") == cap for conv, cap in fused_relu.items())
    refused = find_conv_activations(deploy(model, x, fuse_activations=False), x)[1]
    assert set(timed_relu) - set(fused_relu) <= set(refused)
    for spec in lat.layers:  # every pool follows a modelled layer and shares its output group
        if spec.follows is not None:
            assert spec.follows in {s.name for s in lat.layers if s.follows is None}
