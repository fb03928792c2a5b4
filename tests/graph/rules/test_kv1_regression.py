"""Regression: a head split with a single head (``view(b, s, -1, head_dim)`` where -1 comes out 1).

With one key/value head (LLaMA ``num_key_value_heads=1``) or one attention head (GPT-2, BERT, LLaMA),
the split makes no dim of size > 1, so the head_dim barrier of ``layout._head_split`` never applied: the
projection's channels were offered as an exact group, and after pruning ``view(..., -1, head_dim)``
failed (the written head_dim does not follow pruning). Such a dim is now blocked, also inside modules
with synced sizes; modules that write ``view(b, s, heads, -1)`` (``hf.explicit_attention_``) still prune.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsify import build_channel_graph, hf
from sparsify.extend import register_module_type
from sparsify.graph.channel_graph import ChannelGraph, ChannelGroup
from sparsify.testing.oracle import check_exactness

transformers = pytest.importorskip("transformers")

IDS = {"input_ids": torch.randint(1, 100, (2, 8), generator=torch.Generator().manual_seed(1))}
TOL = 1e-10
ONE_HEAD = "(one attention head)"


def _llama(heads: int = 4, kv_heads: int = 1) -> nn.Module:
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, vocab_size=100,
                                      num_attention_heads=heads, num_key_value_heads=kv_heads, use_cache=False,
                                      pad_token_id=0)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval().double()


def _gpt2(heads: int = 1) -> nn.Module:
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=heads, vocab_size=100, n_positions=32,
                                     use_cache=False, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).eval().double()


def _bert(heads: int = 1) -> nn.Module:
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=heads,
                                     intermediate_size=64, vocab_size=100, max_position_embeddings=32)
    torch.manual_seed(0)
    return transformers.BertForMaskedLM(config).eval().double()


#: (model, the projections whose output channels are split into heads: one group each)
ONE_HEAD_MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[str, ...]]] = {
    "llama_kv1": (lambda: _llama(4, 1), ("v_proj",)),  # k_proj: q·kᵀ couples it with q's (blocked) head_dim
    "llama_1head": (lambda: _llama(1, 1), ("q_proj", "v_proj")),
    "gpt2_1head": (_gpt2, ("c_attn",)),
    "bert_1head": (_bert, ("query", "value")),
}


def _out_groups(cg: ChannelGraph, suffix: str) -> list[ChannelGroup]:
    """The groups holding the output channels (role "out") of every module named ``*.suffix``."""
    found = [g for g in cg.groups if any(m.role == "out" and m.module.endswith(f".{suffix}") for m in g.members)]
    assert found, f"no group holds the outputs of *.{suffix}"
    return found


def _widths(model: nn.Module, suffix: str) -> list[int]:
    return [int(p.shape[-1] if "c_attn" in n else p.shape[0]) for n, p in model.named_parameters()
            if n.endswith(f".{suffix}.weight")]


@pytest.mark.parametrize("name", list(ONE_HEAD_MODELS))
def test_unswapped_one_head_projection_is_blocked_and_oracle_passes(name: str) -> None:
    build, projections = ONE_HEAD_MODELS[name]
    model = build()
    cg = build_channel_graph(model, IDS)
    for proj in projections:
        for g in _out_groups(cg, proj):
            assert not g.prunable, f"{g.name} ({proj} outputs) must not be prunable: its head_dim is a constant"
            assert any(ONE_HEAD in b for b in g.blocked), g.blocked
    widths = {p: _widths(model, p) for p in projections}
    result = check_exactness(model, IDS)  # crashed in view(..., -1, head_dim) before the fix
    assert result.groups_pruned >= 1 and result.max_abs_diff <= TOL * max(1.0, result.output_scale)
    assert {p: _widths(model, p) for p in projections} == widths


def test_llama_kv1_reason_names_the_fix() -> None:
    cg = build_channel_graph(_llama(4, 1), IDS)
    reason = _out_groups(cg, "v_proj")[0].why_not()
    assert "view(b, s, heads, -1)" in reason and "explicit_attention_" in reason and "16" in reason


@pytest.mark.parametrize("name", list(ONE_HEAD_MODELS))
def test_swapped_one_head_still_prunes_and_is_exact(name: str) -> None:
    """After ``hf.explicit_attention_`` (``view(b, s, heads, -1)``) the same projections prune exactly:
    the new rule must not block a one-head split whose head_dim is the -1 (nor SDPA's
    ``reshape(b, -1, L, E)`` of a single head)."""
    build, projections = ONE_HEAD_MODELS[name]
    reference = build()
    model = hf.explicit_attention_(copy.deepcopy(reference))
    cg = build_channel_graph(model, IDS)
    for proj in projections:
        for g in _out_groups(cg, proj):
            assert g.prunable and g.exact, (g.name, g.why_not(), g.inexact)
    if name == "llama_kv1":  # 4 query heads, 1 KV head: q/k head_dim slots as in test_hf_head_dim
        slots = [g for g in cg.prunable_groups() if g.kind == "head_dim"]
        assert len(slots) == 2 and all(g.exact for g in slots)
    widths = {p: _widths(model, p) for p in projections}
    result = check_exactness(model, IDS)
    assert result.max_abs_diff <= TOL * max(1.0, result.output_scale)
    for p in projections:  # the oracle pruned them physically
        assert all(after < before for after, before in zip(_widths(model, p), widths[p], strict=True)), p


# ----- plain modules (torch.fx) ------------------------------------------------------------------------
class HeadView(nn.Module):
    """q/k/v projections of ``width`` channels viewed as ``sizes`` (e.g. (-1, width): one head), SDPA,
    merged back by ``reshape(b, s, -1)``."""

    def __init__(self, sizes: tuple[int, int], width: int = 16) -> None:
        super().__init__()
        self.sizes = sizes
        self.q, self.k, self.v = (nn.Linear(12, width) for _ in range(3))
        self.o = nn.Linear(width, 12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = (p(x).view(b, s, *self.sizes).transpose(1, 2) for p in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v, scale=0.25)
        return self.o(out.transpose(1, 2).reshape(b, s, -1))


class SyncedHeadView(HeadView):
    """The same code, declared as computing its sizes from shapes or synced attributes (as Hugging Face
    attention is): its -1 still says that the written head_dim is the factor that stays."""


register_module_type(SyncedHeadView, synced_sizes=True)


def _v_groups(cg: ChannelGraph) -> list[ChannelGroup]:
    found = [g for g in cg.groups if any(m.module == "v" and m.role == "out" for m in g.members)]
    assert found
    return found


X = torch.randn(2, 5, 12, generator=torch.Generator().manual_seed(2), dtype=torch.float64)


@pytest.mark.parametrize("cls", [HeadView, SyncedHeadView])
@pytest.mark.parametrize("sizes", [(-1, 16), (1, 16)])
def test_constant_head_dim_with_one_head_is_blocked(cls: type[HeadView], sizes: tuple[int, int]) -> None:
    model = cls(sizes).double()
    cg = build_channel_graph(model, X)
    v = _v_groups(cg)
    assert not any(g.prunable for g in v), [g.name for g in v]
    if cls is SyncedHeadView and sizes[0] == -1:
        assert any(ONE_HEAD in b for g in v for b in g.blocked)
    result = check_exactness(model, X)
    assert model.v.out_features == 16 and result.max_abs_diff <= TOL * max(1.0, result.output_scale)


@pytest.mark.parametrize("cls", [HeadView, SyncedHeadView])
def test_one_head_with_free_head_dim_prunes_exactly(cls: type[HeadView]) -> None:
    """``view(b, s, 1, -1)``: the head_dim follows the width, so v/o (and q/k) channels prune."""
    model = cls((1, -1)).double()
    cg = build_channel_graph(model, X)
    v = _v_groups(cg)
    assert all(g.prunable and g.exact for g in v)
    result = check_exactness(model, X)
    assert model.v.out_features < 16 and result.max_abs_diff <= TOL * max(1.0, result.output_scale)
