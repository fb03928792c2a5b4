"""Attention heads and grouped-query KV groups as prunable structures, and the ``heads`` adapter."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsify import GMPConfig, HeadsConfig, Sparsifier, STRConfig, build_channel_graph, prune_channels
from sparsify.adapters.heads import HeadsAdapter
from sparsify.errors import InexactPruneError, PruneError
from sparsify.graph.channel_graph import ChannelGraph, ChannelGroup
from sparsify.nn import ExplicitMultiheadAttention, explicit_multihead_attention_
from sparsify.testing.oracle import check_exactness, random_plan, randomize_, soft_zero_

transformers = pytest.importorskip("transformers")
TOL = 1e-8


# ----- models ------------------------------------------------------------------------------------
def _llama(kv_heads: int = 2, impl: str = "sdpa", layers: int = 2) -> nn.Module:
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                                      num_attention_heads=4, num_key_value_heads=kv_heads, vocab_size=64,
                                      attention_bias=True, use_cache=False, attn_implementation=impl)
    return transformers.LlamaForCausalLM(config).eval().double()


def _gpt2(impl: str = "sdpa") -> nn.Module:
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=32, use_cache=False,
                                     bos_token_id=0, eos_token_id=0, attn_implementation=impl)
    return transformers.GPT2LMHeadModel(config).eval().double()


def _bert() -> nn.Module:
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                                     vocab_size=64, max_position_embeddings=16)
    return transformers.BertModel(config).eval().double()


class SelfAttention(nn.Module):
    """Attention written out: nn.Linear q/k/v/o, view(b, s, -1, head_dim) + transpose into heads,
    F.scaled_dot_product_attention (KV heads repeated by expand + reshape, or enable_gqa), merge back."""

    def __init__(self, dim: int = 24, heads: int = 4, kv_heads: int = 2, head_dim: int = 6, gqa: str = "repeat"):
        super().__init__()
        self.head_dim, self.rep, self.gqa = head_dim, heads // kv_heads, gqa
        self.q, self.k = nn.Linear(dim, heads * head_dim), nn.Linear(dim, kv_heads * head_dim)
        self.v, self.o = nn.Linear(dim, kv_heads * head_dim), nn.Linear(heads * head_dim, dim)

    def _repeat(self, t: torch.Tensor) -> torch.Tensor:
        b, n, s, d = t.shape
        return t[:, :, None].expand(b, n, self.rep, s, d).reshape(b, n * self.rep, s, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = (p(x).view(b, s, -1, self.head_dim).transpose(1, 2) for p in (self.q, self.k, self.v))
        if self.gqa == "repeat":
            y = F.scaled_dot_product_attention(q, self._repeat(k), self._repeat(v), is_causal=True)
        elif self.gqa == "eager":  # matmul → softmax → matmul; k, v broadcast over the query heads
            w = torch.softmax(q @ k.transpose(-1, -2) * self.head_dim ** -0.5, dim=-1)
            y = w @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        return self.o(y.transpose(1, 2).reshape(b, s, -1))


class Block(nn.Module):
    """A pre-norm transformer block around ``SelfAttention`` (traced by torch.fx)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(24)
        self.attn = SelfAttention(**kwargs)
        self.mlp = nn.Sequential(nn.Linear(24, 32), nn.GELU(), nn.Linear(32, 24))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm(x))
        return x + self.mlp(x)


def _ids(vocab: int = 64) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.randint(0, vocab, (2, 8))}


def _heads(cg: ChannelGraph) -> list[ChannelGroup]:
    return [g for g in cg.groups if g.kind in ("head", "kv_group")]


def _member(group: ChannelGroup, suffix: str, dim: int) -> np.ndarray:
    return next(m.structure_of for m in group.members if m.tensor.endswith(suffix) and m.dim == dim)


# ----- the graph: one group per attention layer ----------------------------------------------------
@pytest.mark.parametrize("kv_heads", [2, 4])
def test_llama_heads_oracle_and_generate_after_pruning(kv_heads: int) -> None:
    torch.manual_seed(0)
    model, ids = randomize_(_llama(kv_heads)), _ids()
    cg = build_channel_graph(model, ids)
    heads = _heads(cg)
    assert len(heads) == 2 and all(g.prunable and g.exact for g in heads)
    g = heads[0]
    assert g.kind == ("kv_group" if kv_heads < 4 else "head") and g.width == kv_heads
    rep = 4 // kv_heads
    q, k, v = (_member(g, f"layers.0.self_attn.{p}_proj.weight", 0) for p in "qkv")
    assert (q == np.repeat(np.arange(kv_heads), rep * 8)).all()  # a KV group: its query heads' rows
    assert (k == np.repeat(np.arange(kv_heads), 8)).all() and (v == k).all()
    assert (_member(g, "layers.0.self_attn.o_proj.weight", 1) == q).all()
    assert (_member(g, "layers.0.self_attn.q_proj.bias", 0) == q).all()
    hidden = next(g for g in cg.groups if any(m.tensor == "model.embed_tokens.weight" for m in g.members))
    # the residual stream still prunes through attention (inexact: RMSNorm)
    assert hidden.prunable and not hidden.exact
    plan = {gid: s for gid, s in random_plan(cg).items() if cg.group(gid).kind != "channel"}
    assert len(plan) == 2
    soft_zero_(model, cg.groups, plan)
    soft = copy.deepcopy(model)
    prune_channels(cg, plan, verify_atol=1e-9)
    attn = model.model.layers[0].self_attn
    assert attn.k_proj.out_features == attn.v_proj.out_features == 8 * (kv_heads - kv_heads // 2)
    assert attn.q_proj.out_features == attn.o_proj.in_features == attn.k_proj.out_features * (4 // kv_heads)
    assert attn.num_key_value_groups == 4 // kv_heads  # whole KV groups: the ratio is unchanged
    with torch.no_grad():
        assert (soft(**ids).logits - model(**ids).logits).abs().max() <= TOL
    for use_cache in (True, False):
        kwargs = {"max_new_tokens": 4, "do_sample": False, "use_cache": use_cache, "pad_token_id": 0}
        assert torch.equal(soft.generate(ids["input_ids"], **kwargs), model.generate(ids["input_ids"], **kwargs))


def test_llama_eager_attention_oracle() -> None:
    model = randomize_(_llama(2, "eager", layers=1))
    result = check_exactness(model, _ids(), keep_bias=True)  # biases kept: the v-bias is folded into o_proj
    assert [(g.kind, g.width) for g in _heads(result.graph)] == [("kv_group", 2)]  # repeat_kv seen in q @ kᵀ
    assert result.groups_pruned == 2 and result.max_abs_diff <= 1e-6  # eager softmax runs in float32


@pytest.mark.parametrize("config", ["MistralConfig", "Qwen2Config", "Qwen3Config"])
def test_llama_like_attention_oracle(config: str) -> None:
    cfg = getattr(transformers, config)(hidden_size=32, intermediate_size=48, num_hidden_layers=1, vocab_size=64,
                                        num_attention_heads=4, num_key_value_heads=2, use_cache=False)
    model = randomize_(transformers.AutoModelForCausalLM.from_config(cfg).eval().double())
    result = check_exactness(model, _ids(), keep_bias=True)
    assert [(g.kind, g.width) for g in _heads(result.graph)] == [("kv_group", 2)]
    attn = model.model.layers[0].self_attn  # one of the two KV heads left (Qwen3's head_dim is 128)
    assert result.max_abs_diff <= TOL and attn.k_proj.out_features == attn.head_dim


def test_gpt2_heads_through_conv1d_and_split() -> None:
    torch.manual_seed(0)
    model, ids = randomize_(_gpt2()), _ids()
    cg = build_channel_graph(model, ids)
    heads = _heads(cg)
    assert [g.kind for g in heads] == ["head", "head"] and all(g.width == 4 and g.exact for g in heads)
    c_attn = _member(heads[0], "h.0.attn.c_attn.weight", 1)
    assert (c_attn == np.tile(np.repeat(np.arange(4), 8), 3)).all()  # q|k|v columns of each head
    assert (_member(heads[0], "h.0.attn.c_proj.weight", 0) == np.repeat(np.arange(4), 8)).all()
    hidden = next(g for g in cg.groups if any(m.tensor == "transformer.wte.weight" for m in g.members))
    assert hidden.prunable and not hidden.exact  # LayerNorm
    plan = {g.id: np.array([1, 2]) for g in heads}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PruneError, match=r"restored|differ"):  # heads not zeroed: the outputs change, roll back
        prune_channels(cg, plan, verify_atol=1e-9)
    attn = model.transformer.h[0].attn
    assert (attn.split_size, attn.num_heads, attn.c_attn.nf) == (32, 4, 96)  # the parent's sync was undone too
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    soft_zero_(model, cg.groups, plan)
    soft = copy.deepcopy(model)
    prune_channels(cg, plan, verify_atol=1e-9)
    attn = model.transformer.h[0].attn
    assert (attn.split_size, attn.num_heads, attn.embed_dim) == (16, 2, 16)
    assert (attn.c_attn.nf, attn.c_proj.nx) == (48, 16)
    with torch.no_grad():
        assert (soft(**ids).logits - model(**ids).logits).abs().max() <= TOL
    for use_cache in (True, False):
        kwargs = {"max_new_tokens": 4, "do_sample": False, "use_cache": use_cache, "pad_token_id": 0}
        assert torch.equal(soft.generate(ids["input_ids"], **kwargs), model.generate(ids["input_ids"], **kwargs))


def test_bert_oracle_and_attributes() -> None:
    model = randomize_(_bert())
    result = check_exactness(model, _ids(), keep_bias=True)
    assert result.max_abs_diff <= TOL
    heads = _heads(result.graph)
    assert len(heads) == 2 and {g.name for g in heads} <= set(result.report.widths)
    attn = model.encoder.layer[0].attention.self
    assert attn.num_attention_heads == 2 and attn.all_head_size == 16 == attn.query.out_features


# ----- hand-written attention (torch.fx) --------------------------------------------------------------
@pytest.mark.parametrize(("kwargs", "kind", "width"), [
    ({}, "kv_group", 2), ({"gqa": "sdpa"}, "kv_group", 2), ({"kv_heads": 4}, "head", 4),
], ids=["repeat_kv", "enable_gqa", "mha"])
@pytest.mark.parametrize("keep_bias", [False, True])
def test_explicit_attention_oracle(kwargs: dict, kind: str, width: int, keep_bias: bool) -> None:
    model, x = randomize_(Block(**kwargs).double()), torch.randn(2, 5, 24, dtype=torch.float64)
    heads = _heads(build_channel_graph(model, x))
    assert [(g.kind, g.width, g.exact) for g in heads] == [(kind, width, True)]
    result = check_exactness(model, x, keep_bias=keep_bias)
    assert result.max_abs_diff <= TOL and heads[0].name in result.report.widths
    rep = 2 if kind == "kv_group" else 1
    assert model.attn.q.out_features == model.attn.o.in_features == model.attn.k.out_features * rep < 24


def test_hard_coded_head_count_is_a_barrier_that_says_how_to_fix_it() -> None:
    from sparsify.testing import models

    model, x = models.transformer_block(torch.float64)  # view(b, n, self.heads, c // self.heads)
    cg = build_channel_graph(model, x)
    qkv = next(g for g in cg.groups if any(m.tensor == "attn.qkv.weight" and m.dim == 0 for m in g.members))
    assert not qkv.prunable and any("view(b, s, -1, head_dim)" in r for r in qkv.blocked)


def test_query_heads_sharing_one_broadcast_kv_head_are_not_removed_silently() -> None:
    """Multi-query attention with k, v broadcast: zeroing a query head leaves softmax(0) @ v ≠ 0."""
    model, x = randomize_(Block(kv_heads=1, gqa="eager").double()), torch.randn(2, 5, 24, dtype=torch.float64)
    cg = build_channel_graph(model, x)
    q = next(g for g in cg.groups if any(m.tensor == "attn.q.weight" and m.dim == 0 for m in g.members))
    assert q.prunable and q.sinks  # the weights @ v product must see removed heads as exact zeros
    soft_zero_(model, cg.groups, {q.id: np.array([0])})
    with pytest.raises(InexactPruneError, match="broadcast"):
        prune_channels(cg, {q.id: [0]})


# ----- the heads adapter ---------------------------------------------------------------------------
def _train(model: nn.Module, ids: dict[str, torch.Tensor], sp: Sparsifier, steps: int) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    for _ in range(steps):
        loss = model(**ids, labels=ids["input_ids"]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sp.step()


@pytest.mark.parametrize("build", [_llama, _gpt2], ids=["llama_gqa", "gpt2"])
def test_heads_adapter_gmp_prunes_whole_heads_exactly(build: Any) -> None:
    torch.manual_seed(0)
    model, ids = build(), _ids()
    policy = GMPConfig(sparsity=0.5, start_step=0, end_step=3, update_every=1)
    sp = Sparsifier(model, ids, adapter="heads", policy=policy)
    assert len(sp.vectors) == 2 and all(v.group.kind in ("head", "kv_group") for v in sp.vectors)
    assert "mlp" in " ".join(sp.adapter.skipped)  # MLP neurons are another adapter's
    _train(model, ids, sp, 4)
    with torch.no_grad():
        soft = model(**ids).logits
    result = sp.prune()
    with torch.no_grad():
        assert (soft - model(**ids).logits).abs().max() <= TOL
    assert all(after == before // 2 for before, after in result.widths.values())
    out = model.generate(ids["input_ids"], max_new_tokens=3, min_new_tokens=3, do_sample=False, use_cache=True,
                         pad_token_id=0)
    assert out.shape == (2, 11)
    if build is _llama:
        attn = model.model.layers[0].self_attn
        assert (attn.k_proj.out_features, attn.q_proj.out_features, attn.num_key_value_groups) == (8, 16, 2)


def test_heads_adapter_str_zeroes_the_weak_head() -> None:
    torch.manual_seed(0)
    model, ids = _gpt2(), _ids()
    attn = model.transformer.h[0].attn
    with torch.no_grad():  # make head 2 of layer 0 weak: its q/k/v columns and c_proj rows
        cols = torch.arange(16, 24)
        attn.c_attn.weight[:, torch.cat([cols, cols + 32, cols + 64])] *= 1e-3
        attn.c_proj.weight[cols] *= 1e-3
        qkv = attn.c_attn.weight[:, torch.cat([cols, cols + 32, cols + 64])]
        expected = (qkv.square().sum() + attn.c_proj.weight[cols].square().sum()).sqrt()
    sp = Sparsifier(model, ids, adapter="heads", policy=STRConfig(s_init=-3.0))
    raw = sp.vectors[0].raw().detach()
    columns = HeadsAdapter(HeadsConfig(source="o")).vectors(sp.graph)[0].raw().detach()
    assert int(raw.argmin()) == int(columns.argmin()) == 2 and (columns < raw).all()
    assert torch.allclose(raw[2], expected)  # the L2 norm of the head's q/k/v columns and c_proj rows
    _train(model, ids, sp, 2)
    zeros = sp.zero_structures()
    assert zeros[sp.vectors[0].group.id].tolist() == [2]
    with torch.no_grad():
        soft = model(**ids).logits
    sp.prune()
    assert model.transformer.h[0].attn.num_heads == 3 and model.transformer.h[1].attn.num_heads == 4
    with torch.no_grad():
        assert (soft - model(**ids).logits).abs().max() <= TOL


# ----- nn.MultiheadAttention: swapped for explicit attention ----------------------------------------
@pytest.mark.parametrize("batch_first", [True, False])
def test_explicit_multihead_attention_computes_what_the_module_does(batch_first: bool) -> None:
    mha = nn.MultiheadAttention(16, 4, batch_first=batch_first).double().eval()
    explicit = explicit_multihead_attention_(nn.Sequential(mha))[0]
    assert isinstance(explicit, ExplicitMultiheadAttention)
    q, kv = torch.randn(2, 5, 16, dtype=torch.float64), torch.randn(2, 7, 16, dtype=torch.float64)
    if not batch_first:
        q, kv = q.transpose(0, 1), kv.transpose(0, 1)
    masks = {"key_padding_mask": torch.rand(2, 7) > 0.7, "attn_mask": torch.rand(5, 7) > 0.8}
    expected, _ = mha(q, kv, kv, **masks)
    assert (explicit(q, kv, kv, **masks)[0] - expected).abs().max() <= 1e-12


def test_vit_heads_prunable_after_the_swap(tv: Any) -> None:
    vit = tv.models.VisionTransformer(image_size=16, patch_size=8, num_layers=1, num_heads=4, hidden_dim=16,
                                      mlp_dim=24, num_classes=3)
    model, x = randomize_(vit.double().eval()), torch.randn(2, 3, 16, 16, dtype=torch.float64)
    assert not _heads(build_channel_graph(model, x))  # nn.MultiheadAttention: a leaf barrier
    explicit_multihead_attention_(model)
    heads = _heads(build_channel_graph(model, x))
    assert [(g.kind, g.width, g.exact) for g in heads] == [("head", 4, True)]
    result = check_exactness(model, x, keep_bias=True)
    assert result.max_abs_diff <= TOL and heads[0].name in result.report.widths
    assert model.encoder.layers[0].self_attention.num_heads == 2


class HeadCount(nn.Module):
    """Heads counted from the projection's own width (follows pruning) or from the block input's."""

    def __init__(self, source: str) -> None:
        super().__init__()
        self.source, self.head_dim = source, 6
        self.q, self.k, self.v, self.o = (nn.Linear(24, 24) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        heads = []
        for proj in (self.q, self.k, self.v):
            t = proj(x)
            count = (t.shape[-1] if self.source == "own" else c) // self.head_dim
            heads.append(t.view(b, n, count, self.head_dim).transpose(1, 2))
        return self.o(F.scaled_dot_product_attention(*heads).transpose(1, 2).reshape(b, n, -1))


@pytest.mark.parametrize("source", ["own", "input"])
def test_computed_head_count_must_come_from_the_split_tensor(source: str) -> None:
    model, x = HeadCount(source).double(), torch.randn(2, 5, 24, dtype=torch.float64)
    heads = _heads(build_channel_graph(model, x))
    if source == "input":  # c // head_dim would stay 4 after pruning q: a barrier, not a broken view
        q = next(g for g in build_channel_graph(model, x).groups
                 if any(m.tensor == "q.weight" and m.dim == 0 for m in g.members))
        assert not q.prunable
        return
    assert [(g.kind, g.width) for g in heads] == [("head", 4)]
    assert check_exactness(model, x).max_abs_diff <= TOL and model.q.out_features == 12
