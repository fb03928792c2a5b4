"""Property test: deploy on random small CNN DAGs (sparsify.testing.fuzz) keeps the outputs, and the latency
model times exactly the fusions and merged biases deploy makes (conv → BN → add(·, conv(y)) → ReLU and the rest).

``SPARSIFY_FUZZ_EXAMPLES`` (default 300 in the fuzz test) sets the number of architectures here too (a third).
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparsify.deploy import deploy
from sparsify.errors import SparsifyError
from sparsify.graph.channel_graph import build_channel_graph
from sparsify.measure.latency_model import LatencyModel
from sparsify.testing.fuzz import Spec, architectures, build

EXAMPLES = max(int(os.environ.get("SPARSIFY_FUZZ_EXAMPLES", "300")) // 3, 10)


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large])
@given(spec=architectures(), seed=st.integers(0, 3))
def test_random_architectures_deploy_exactly_and_are_timed_as_deployed(spec: Spec, seed: int) -> None:
    if spec[0].get("wrap") or any(layer.get("wn") for layer in spec[1:]):
        return  # wrappers and weight norm are refused by deploy (tests/deploy, tests/misuse)
    model, x = build(spec, seed=seed)
    model.eval()
    for m in model.modules():  # running statistics away from 0/1, so folding changes every value
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    try:
        deployed = deploy(model, x, channels_last=False)
    except SparsifyError as exc:
        pytest.fail(f"deploy refused a plain model: {exc}")
    with torch.no_grad():
        want, got = model(x), deployed(x)
    torch.testing.assert_close(got, want, atol=1e-9 * (1 + float(want.abs().max())), rtol=1e-9)
    fusions = getattr(deployed, "sparsify_fusions", [])
    lat = LatencyModel(build_channel_graph(model, x), step=4, latency_fn=lambda s, i, o: 1.0)
    timed_add = {s.name.removesuffix(".weight") for s in lat.layers if s.add_relu}
    timed_merged = {s.name.removesuffix(".weight") for s in lat.layers if s.bias_merged}
    assert timed_add == {f.conv for f in fusions if f.add is not None}
    assert timed_merged == {f.bias_from for f in fusions if f.bias_from}
