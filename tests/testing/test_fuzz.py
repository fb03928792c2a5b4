"""Property test: random small CNN DAGs (sparsify.testing.fuzz) pruned by the exactness oracle.

``SPARSIFY_FUZZ_EXAMPLES`` sets the number of architectures (default 150, about 10 s); the long
profile is ``python -m benchmarks.fuzz_long``; the property itself is
``sparsify.testing.fuzz.check_spec``. Bugs the fuzzer found are kept below as strict xfails with
their minimal specs; the property test steers around them (see ``_empties_a_member`` and
``singleton_heads=False``) so that it keeps finding new ones.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from sparsify import build_channel_graph, prune_channels
from sparsify.errors import PruneError, TraceError
from sparsify.testing.fuzz import Spec, architectures, build, check_spec

EXAMPLES = int(os.environ.get("SPARSIFY_FUZZ_EXAMPLES", "300"))


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large])
@given(spec=architectures(), seed=st.integers(0, 3))
def test_random_architectures_prune_exactly(spec: Spec, seed: int) -> None:
    for keep_bias in (False, True):
        event(f"keep_bias={keep_bias}: {check_spec(spec, keep_bias, seed)}")


# ----- regressions found by the fuzzer ------------------------------------------------------------
def _input(c: int, s: int) -> dict[str, Any]:
    return {"op": "input", "channels": c, "size": s}


def _conv(x: int, cout: int) -> dict[str, Any]:
    return {"op": "conv", "x": x, "cout": cout, "k": 1, "stride": 1, "pad": 0, "groups": 1, "bias": False}


CAT_OF_BRANCHES = [_input(1, 2), _conv(0, 2), _conv(0, 2), {"op": "cat", "xs": [1, 2]},
                   {"op": "head", "x": 3, "kind": "pool", "out": 1}]
CHUNK_BRANCH = [_input(3, 2), _conv(0, 4), {"op": "chunk", "x": 1, "fn": "conv", "swap": False},
                {"op": "head", "x": 2, "kind": "pool", "out": 1}]
SINGLETON_SHUFFLE = [_input(1, 2), _conv(0, 3), {"op": "shuffle", "x": 1, "groups": 3, "dyn": True},
                     {"op": "head", "x": 2, "kind": "flatten", "out": 1}]


def test_regression_plan_that_empties_a_branch_is_refused() -> None:
    """cat([conv_a(x), conv_b(x)]) is one group whose structures come 2 from each conv: a plan may not
    take all of one conv's (found by the fuzzer: it used to slice conv_a to 0 channels)."""
    model, x = build(CAT_OF_BRANCHES)
    cg = build_channel_graph(model, x)
    group = next(g for g in cg.prunable_groups() if g.width == 4)
    conv_a = next(m for m in group.members if m.tensor == "layers.1.weight" and m.role == "out")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PruneError, match="leave that layer empty"):
        prune_channels(cg, {group.id: np.unique(conv_a.structure_of)})
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert check_spec(CAT_OF_BRANCHES, keep_bias=False).startswith("pruned")


def test_regression_chunk_branch() -> None:
    assert check_spec(CHUNK_BRANCH, keep_bias=False).startswith("pruned")


@pytest.mark.parametrize("dyn", [True, False])
def test_regression_singleton_group_view_is_a_barrier(dyn: bool) -> None:
    """x.view(b, g, c // g, h, w) with g == c: g is a constant, so the channels must not be pruned."""
    spec = [dict(layer) for layer in SINGLETON_SHUFFLE]
    spec[2]["dyn"] = dyn
    model, x = build(spec)
    cg = build_channel_graph(model, x)
    stem = next(g for g in cg.groups if any(m.tensor == "layers.1.weight" and m.role == "out" for m in g.members))
    assert not stem.prunable and "constant" in stem.why_not()
    check_spec(spec, keep_bias=False)


# ----- the shipped module without the dev extra ----------------------------------------------------
_WITHOUT_HYPOTHESIS = """
import json
import sys
sys.modules["hypothesis"] = None  # import hypothesis now raises ImportError
from sparsify.testing.fuzz import architectures, check_spec
print(check_spec(json.loads(sys.argv[1]), keep_bias=False))
try:
    architectures()
except ImportError as exc:
    print("ImportError:", exc)
"""


def test_fuzz_module_imports_and_checks_without_hypothesis() -> None:
    """sparsify.testing.fuzz imports and runs check_spec with hypothesis hidden; architectures() then
    says how to install it."""
    out = subprocess.run([sys.executable, "-c", _WITHOUT_HYPOTHESIS, json.dumps(CHUNK_BRANCH)], capture_output=True,
                         text=True, timeout=300, check=True).stdout
    assert out.splitlines()[0].startswith("pruned"), out
    assert "pip install 'sparsify-structured[dev]'" in out


# ----- parametrized and wrapped architectures (issue #17) -------------------------------------------
WRAPPED_WEIGHT_NORM = [{"op": "input", "channels": 3, "size": 4, "wrap": "data_parallel"},
                       {**_conv(0, 4), "wn": True}, _conv(1, 4), _conv(2, 3),
                       {"op": "head", "x": 3, "kind": "pool", "out": 2}]


@pytest.mark.parametrize("wrap", ["data_parallel", "compile", None])
def test_weight_norm_channels_are_barriers_and_the_rest_prunes(wrap: str | None) -> None:
    spec = [{**WRAPPED_WEIGHT_NORM[0], "wrap": wrap}, *WRAPPED_WEIGHT_NORM[1:]]
    assert check_spec(spec, keep_bias=False) == "pruned 2 groups"  # convs 2 and 3; conv 1's group is a barrier
    plain = [spec[0], {**spec[1], "wn": False}, *spec[2:]]
    assert check_spec(plain, keep_bias=False) == "pruned 3+ groups"
    model, x = build(spec)
    if wrap is not None:
        with pytest.raises(TraceError, match=r"\._orig_mod|\.module"):
            build_channel_graph(model, x)
