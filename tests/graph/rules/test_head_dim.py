"""Head-dimension slots as prunable structures: slot j of every head of a layer, removed together.

An attention module that writes its head count as a constant and lets the head_dim follow the width
(``view(b, s, heads, -1)``) gets two groups per layer: the q/k slots (q·kᵀ sums over them) and the
v/output-projection slots, independent of each other. Whole heads are then the barrier.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsify import GMPConfig, HeadsConfig, Sparsifier, SparsifyError, STRConfig, build_channel_graph, prune_channels
from sparsify.errors import InexactPruneError
from sparsify.graph.channel_graph import ChannelGraph, ChannelGroup
from sparsify.testing.oracle import check_exactness, randomize_, soft_zero_

TOL = 1e-10


class SlotAttention(nn.Module):
    """Attention with a fixed head count: ``view(b, s, heads, -1)``, so head_dim shrinks with pruning.
    ``scale``: "explicit" passes the original 1/sqrt(head_dim) (a float fixed at construction),
    "default" leaves SDPA's default (1/sqrt of the current head_dim). ``gqa``: "sdpa" (enable_gqa),
    "repeat" (expand + reshape), "eager" (matmul → softmax → matmul, after the same repeat)."""

    def __init__(self, heads: int = 4, kv_heads: int = 2, head_dim: int = 6, gqa: str = "sdpa",
                 scale: str = "explicit", rotary: str = "") -> None:
        super().__init__()
        self.heads, self.kv_heads, self.gqa, self.rotary = heads, kv_heads, gqa, rotary
        if rotary:  # LLaMA-style rotary tables for 5 positions, as buffers (sliced with the slots)
            freqs = torch.outer(torch.arange(5.0), 1e4 ** -(torch.arange(0, head_dim, 2) / head_dim))
            self.register_buffer("cos", torch.cat((freqs, freqs), -1).cos())
            self.register_buffer("sin", torch.cat((freqs, freqs), -1).sin())
        self.scale = head_dim ** -0.5 if scale == "explicit" else None
        self.q, self.k = nn.Linear(24, heads * head_dim), nn.Linear(24, kv_heads * head_dim)
        self.v, self.o = nn.Linear(24, kv_heads * head_dim), nn.Linear(heads * head_dim, 24)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.q(x).view(b, s, self.heads, -1).transpose(1, 2)
        k, v = (p(x).view(b, s, self.kv_heads, -1).transpose(1, 2) for p in (self.k, self.v))
        if self.rotary:
            q, k = (t * self.cos + self._rotate_half(t) * self.sin for t in (q, k))
        if self.gqa != "sdpa" and self.kv_heads < self.heads:  # repeat_kv: expand + reshape
            rep = self.heads // self.kv_heads
            k, v = (t[:, :, None].expand(b, self.kv_heads, rep, s, t.shape[-1]).reshape(b, self.heads, s, -1)
                    for t in (k, v))
        if self.gqa == "eager":
            y = torch.softmax(q @ k.transpose(-1, -2) * self.scale, dim=-1) @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale,
                                               enable_gqa=self.gqa == "sdpa")
        return self.o(y.transpose(1, 2).reshape(b, s, -1))


    def _rotate_half(self, x: torch.Tensor) -> torch.Tensor:
        d = x.shape[-1]  # "literal": a constant bound; "offset": d - 3, which does not scale with d
        half = {"computed": d // 2, "literal": 3, "offset": d - 3}[self.rotary]
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Block(nn.Module):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(24)
        self.attn = SlotAttention(**kwargs)
        self.mlp = nn.Sequential(nn.Linear(24, 32), nn.GELU(), nn.Linear(32, 24))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm(x))
        return x + self.mlp(x)


def _model(**kwargs: Any) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return randomize_(Block(**kwargs).double()), torch.randn(2, 5, 24, dtype=torch.float64)


def _slots(cg: ChannelGraph, prefix: str = "attn.") -> tuple[ChannelGroup, ChannelGroup]:
    """(the q/k slot group, the v/o slot group)."""
    groups = [g for g in cg.groups if g.kind == "head_dim"]
    assert len(groups) == 2, [(g.name, g.kind) for g in cg.groups]
    qk = next(g for g in groups if any(m.tensor == f"{prefix}q.weight" for m in g.members))
    vo = next(g for g in groups if any(m.tensor == f"{prefix}v.weight" for m in g.members))
    return qk, vo


def _structure_of(group: ChannelGroup, tensor: str, dim: int) -> np.ndarray:
    return next(m.structure_of for m in group.members if m.tensor == tensor and m.dim == dim)


VARIANTS = [({}, "sdpa_gqa"), ({"gqa": "repeat"}, "repeat_kv"), ({"kv_heads": 4}, "mha"),
            ({"rotary": "computed"}, "rotary"), ({"kv_heads": 4, "gqa": "eager"}, "eager"),
            ({"gqa": "eager"}, "eager_gqa")]


@pytest.mark.parametrize("kwargs", [v[0] for v in VARIANTS], ids=[v[1] for v in VARIANTS])
def test_slot_groups_are_uniform_over_heads_and_exact(kwargs: dict) -> None:
    model, x = _model(**kwargs)
    cg = build_channel_graph(model, x)
    qk, vo = _slots(cg)
    rotary = "rotary" in kwargs  # rotary pairs: slots j and j + 3 are one structure
    assert (qk.width, vo.width) == (3 if rotary else 6, 6) and all(g.prunable and g.exact for g in (qk, vo))
    assert qk.sinks  # q·kᵀ sums over the slots: a removed slot must reach it as an exact zero
    kv = model.attn.kv_heads
    slot = np.tile(np.arange(6), 4)  # row h·6 + j of q is slot j, in every head
    qk_slot = np.arange(6) % 3 if rotary else np.arange(6)
    assert (_structure_of(qk, "attn.q.weight", 0) == np.tile(qk_slot, 4)).all()
    assert (_structure_of(qk, "attn.k.weight", 0) == np.tile(qk_slot, kv)).all()
    if rotary:
        assert (_structure_of(qk, "attn.cos", 1) == qk_slot).all()  # the tables lose the same columns
    assert (_structure_of(vo, "attn.v.weight", 0) == np.tile(np.arange(6), kv)).all()
    assert (_structure_of(vo, "attn.o.weight", 1) == slot).all()
    heads = [g for g in cg.groups if any(m.tensor == "attn.o.weight" and m.dim == 1 for m in g.members)
             and g.kind in ("head", "kv_group")]
    assert heads and not any(g.prunable for g in heads)  # the head count is a constant here
    assert any("head_dim slots are prunable" in r for g in heads for r in g.blocked)
    # a different number of slots from q/k and from v/o: the two groups are independent
    plan = {qk.id: np.array([0, 2] if rotary else [0, 2, 5]), vo.id: np.array([1])}
    soft_zero_(model, cg.groups, plan)
    soft = copy.deepcopy(model)
    prune_channels(cg, plan, verify_atol=1e-12)
    attn = model.attn
    kept = 2 if rotary else 3
    assert (attn.q.out_features, attn.k.out_features) == (4 * kept, kv * kept)
    assert (attn.v.out_features, attn.o.in_features) == (kv * 5, 4 * 5)
    with torch.no_grad():
        assert (soft(x) - model(x)).abs().max() <= TOL


@pytest.mark.parametrize("kwargs", [v[0] for v in VARIANTS[:4]], ids=[v[1] for v in VARIANTS[:4]])
def test_oracle(kwargs: dict) -> None:
    model, x = _model(**kwargs)
    result = check_exactness(model, x)
    names = {g.name for g in _slots(result.graph)}
    assert result.max_abs_diff <= TOL and names <= set(result.report.widths)
    q_kept = 2 if "rotary" in kwargs else 3  # rotary: 2 of the 3 pairs removed, one pair (2 slots) kept
    assert model.attn.q.out_features == 4 * q_kept and model.attn.o.in_features == 12


@pytest.mark.parametrize("rotary", ["literal", "offset"])
def test_rotary_slice_whose_bound_does_not_scale_is_a_barrier(rotary: str) -> None:
    model, x = _model(rotary=rotary)
    cg = build_channel_graph(model, x)
    qk = next(g for g in cg.groups if any(m.tensor == "attn.q.weight" and m.dim == 0 for m in g.members))
    assert not qk.prunable and any("x.shape[-1] // 2" in r for r in qk.blocked)


def test_default_sdpa_scale_is_inexact_and_says_how_to_fix_it() -> None:
    """SDPA's default scale is 1/sqrt(current head_dim): removing q/k slots would change it."""
    model, x = _model(scale="default")
    cg = build_channel_graph(model, x)
    qk, vo = _slots(cg)
    assert not qk.exact and any("scale=" in r for r in qk.inexact) and vo.exact
    soft_zero_(model, cg.groups, {qk.id: np.array([0])})
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(InexactPruneError, match="scale="):
        prune_channels(cg, {qk.id: [0]})
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # untouched


class ShapeScale(nn.Module):
    """Eager attention whose scale is read from q's current width: pruning slots would change it."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(24, 24) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = (p(x).view(b, s, 4, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
        w = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
        return self.o((w @ v).transpose(1, 2).reshape(b, s, -1))


def test_a_scale_read_from_the_head_dim_is_inexact() -> None:
    model, x = randomize_(ShapeScale().double()), torch.randn(2, 5, 24, dtype=torch.float64)
    qk, vo = _slots(build_channel_graph(model, x), prefix="")
    assert not qk.exact and any("reads the size of dim 3" in r for r in qk.inexact) and vo.exact
    result = check_exactness(model, x)  # prunes the exact v/o slots only
    assert result.max_abs_diff <= TOL and set(result.report.widths) == {vo.name}


def test_kept_bias_of_a_query_slot_is_not_removed_silently() -> None:
    """A q slot whose weights are zero but whose bias is not still adds bias·k to the scores (no
    parameter can absorb that); a v slot's bias folds into the output projection's bias."""
    model, x = _model()
    cg = build_channel_graph(model, x)
    qk, vo = _slots(cg)
    soft_zero_(model, cg.groups, {qk.id: np.array([1]), vo.id: np.array([2, 3])}, keep_bias=True)
    with pytest.raises(InexactPruneError):
        prune_channels(cg, {qk.id: [1]})
    with torch.no_grad():
        reference = model(x)
    cg = build_channel_graph(model, x)  # the failed prune left the model (and graph) untouched
    prune_channels(cg, {_slots(cg)[1].id: [2, 3]})
    with torch.no_grad():
        assert (reference - model(x)).abs().max() <= TOL
    assert model.attn.v.out_features == 2 * 4


@pytest.mark.parametrize(("policy", "rotary"), [("str", ""), ("gmp", ""), ("gmp", "computed")])
def test_heads_adapter_exposes_slots_to_str_and_gmp(policy: str, rotary: str) -> None:
    model, x = _model(rotary=rotary)
    config = GMPConfig(sparsity=0.5, start_step=0, end_step=3, update_every=1) if policy == "gmp" else STRConfig(
        s_init=-3.0)
    attn, weak = model.attn, torch.arange(2, 24, 6)  # slot 2 of every head
    with torch.no_grad():  # make slot 2 weak in both groups: its q, k, v rows and o columns
        for w in (attn.q.weight, attn.k.weight[:12], attn.v.weight[:12], attn.o.weight.T):
            w[weak[:len(w) // 6]] *= 1e-3
    plain = copy.deepcopy(model)  # before the Sparsifier: a copy of a model with its masks is refused
    sp = Sparsifier(model, x, adapter=HeadsConfig(head_dim=True), policy=config)
    qk, vo = _slots(sp.graph)
    assert sorted(v.group.name for v in sp.vectors) == sorted([qk.name, vo.name])
    scaled = {m.tensor for v in sp.vectors for m in v.handle["scaled"]}
    assert "attn.q.weight" in scaled and "attn.cos" not in scaled  # the rotary tables are not the weights
    with pytest.raises(SparsifyError, match="head_dim=True"):  # opt-in
        Sparsifier(plain, x, adapter="heads", policy=config)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    for _ in range(4):
        loss = model(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sp.step()
    zeros = sp.zero_structures()
    assert all(0 < len(zeros[g.id]) < 6 for g in (qk, vo)), zeros
    if policy == "str":
        assert all(zeros[g.id].tolist() == [2] for g in (qk, vo)), zeros
    with torch.no_grad():
        soft = model(x)
    result = sp.prune()
    with torch.no_grad():
        assert (soft - model(x)).abs().max() <= TOL
    pair = 2 if rotary else 1  # a rotary structure is 2 slots
    assert attn.q.out_features == 4 * pair * result.widths[qk.name][1]
    assert attn.o.in_features == 4 * result.widths[vo.name][1]
