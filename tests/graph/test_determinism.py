"""Graph building is deterministic: the same model gives the same channel groups in one process, in
separate processes, and whatever uninitialised memory holds (issue #21: Phi-3 gave three different
group sets in four processes)."""

from __future__ import annotations

import numpy as np
import pytest

from sparsify import build_channel_graph
from sparsify.testing import models
from sparsify.testing.determinism import assert_same_groups, check_deterministic, signatures_in_subprocess

BUILDERS = ["sparsify.testing.models:fused_qkv_slice_net", "sparsify.testing.models:shufflenet",
            "sparsify.testing.models:transformer_block", "sparsify.testing.hf_models:phi3"]


def _hf_available() -> bool:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def _builders() -> list[str]:
    return BUILDERS if _hf_available() else BUILDERS[:-1]


def _build(builder: str):
    module, _, name = builder.partition(":")
    if module.endswith("hf_models"):
        from sparsify.testing import hf_models

        return getattr(hf_models, name)()
    return getattr(models, name)()


@pytest.mark.parametrize("builder", _builders())
def test_building_twice_in_one_process_gives_the_same_groups(builder: str) -> None:
    check_deterministic(lambda: _build(builder))


def test_building_in_separate_processes_gives_the_same_groups() -> None:
    builders = _builders()
    here = [build_channel_graph(*_build(b)).signature() for b in builders]
    assert signatures_in_subprocess(builders) == here  # another process: other memory, other hash seed


def _poisoned(real):
    def empty(shape, dtype=float, *args, **kwargs):
        out = real(shape, dtype, *args, **kwargs)
        out.fill(np.iinfo(out.dtype).max // 2 if np.issubdtype(out.dtype, np.integer) else np.nan)
        return out
    return empty


def _poisoned_like(real):
    def empty_like(a, dtype=None, *args, **kwargs):
        out = real(a, dtype, *args, **kwargs)
        out.fill(np.iinfo(out.dtype).max // 2 if np.issubdtype(out.dtype, np.integer) else np.nan)
        return out
    return empty_like


@pytest.mark.parametrize("builder", _builders())
def test_graph_building_reads_no_uninitialised_memory(monkeypatch: pytest.MonkeyPatch, builder: str) -> None:
    clean = build_channel_graph(*_build(builder))
    monkeypatch.setattr(np, "empty", _poisoned(np.empty))  # what np.empty hands out is garbage: make it loud
    monkeypatch.setattr(np, "empty_like", _poisoned_like(np.empty_like))
    assert_same_groups(clean, build_channel_graph(*_build(builder)))


def test_the_signature_tells_different_groups_apart() -> None:
    a = build_channel_graph(*models.shufflenet())
    b = build_channel_graph(*models.shufflenet())
    b.groups[0].blocked.append("a difference")
    assert a.signature() != b.signature()
    with pytest.raises(AssertionError, match="differs in"):
        assert_same_groups(a, b)
