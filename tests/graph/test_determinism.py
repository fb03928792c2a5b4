"""Graph building is deterministic: the same model gives the same channel groups in one process, in
separate processes, and whatever uninitialised memory holds (issue #21: Phi-3 gave three different
group sets in four processes)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from sparsify import build_channel_graph
from sparsify.graph.rules.layout_chain import coords
from sparsify.testing import models
from sparsify.testing.determinism import assert_same_groups, check_deterministic, signatures_in_subprocess
from sparsify.testing.oracle import check_exactness

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


# ----- a table expanded over frames (torchvision MViT's positional encoding; repeat_kv's expand + reshape) -----
class ExpandedTable(nn.Module):
    """A (tokens, width) parameter broadcast over frames and flattened (``unsqueeze(0).expand(T, -1, -1)
    .reshape(-1, width)``), added to a projection: large enough (8 × 256 × 32 elements) that NumPy's
    ``unravel_index`` on the expanded index tensor read past its buffer (numpy/numpy#31980), so the layout
    rule failed with a memory address in its reason, a different one in every process."""

    def __init__(self, frames: int = 8, tokens: int = 256, width: int = 32) -> None:
        super().__init__()
        self.frames = frames
        self.proj = nn.Linear(16, width)
        self.pos = nn.Parameter(torch.randn(tokens, width))
        self.head = nn.Linear(width, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, width = self.pos.shape
        pos = self.pos.unsqueeze(0).expand(self.frames, -1, -1).reshape(-1, width)
        return self.head(self.proj(x) + pos)


def expanded_table_net(dtype: torch.dtype = torch.float32) -> models.Example:
    torch.manual_seed(0)
    return ExpandedTable().to(dtype), torch.randn(2, 8 * 256, 16, dtype=dtype)


def _coords_by_division(in_shape: tuple[int, ...], idx: torch.Tensor) -> list[torch.Tensor]:
    strides = np.cumprod((1, *reversed(in_shape[1:])))[::-1]
    return [(idx // int(strides[i])) % in_shape[i] for i in range(len(in_shape))]


@pytest.mark.parametrize(("make", "in_shape"), [
    (lambda: torch.arange(256 * 32).reshape(256, 32).unsqueeze(0).expand(8, -1, -1), (256, 32)),  # expand
    (lambda: torch.arange(100 * 100).reshape(100, 100).unsqueeze(0).expand(2, -1, -1), (100, 100)),
    (lambda: torch.arange(20000).reshape(20000, 1), (20000,)),  # a unit trailing dim
    (lambda: torch.arange(3 * 4000).reshape(3, 4000).t()[:, :2], (3, 4000)),  # transposed and sliced
], ids=["expand", "expand_square", "unit_dim", "strided"])
def test_coords_of_an_expanded_or_unit_dim_index_tensor_are_exact(make, in_shape: tuple[int, ...]) -> None:
    idx = make()
    for got, want in zip(coords(in_shape, idx), _coords_by_division(in_shape, idx), strict=True):
        assert got.shape == idx.shape
        assert torch.equal(got, want)


def test_a_table_expanded_over_frames_is_one_prunable_group_in_every_process(monkeypatch: pytest.MonkeyPatch
                                                                           ) -> None:
    cg = build_channel_graph(*expanded_table_net())
    assert not any("failed" in r or "out of bounds" in r for g in cg.groups for r in g.blocked)
    (group,) = [g for g in cg.groups if any(m.tensor == "proj.weight" and m.role == "out" for m in g.members)]
    assert group.prunable and {("pos", 1), ("head.weight", 1)} <= {(m.tensor, m.dim) for m in group.members}
    result = check_exactness(*expanded_table_net(torch.float64))
    assert result.groups_pruned >= 1 and result.max_abs_diff <= 1e-5
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parents[2]))
    builder = f"{__name__}:expanded_table_net"
    assert signatures_in_subprocess([builder]) == [cg.signature()]  # other memory, other hash seed
