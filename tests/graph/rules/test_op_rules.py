"""Op rules: the exactness oracle and the expected channel groups on the small models of
``sparsify.testing.models`` (each exercises a few op rules or one topology)."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from sparsify import build_channel_graph, prune_channels
from sparsify.errors import InexactPruneError
from sparsify.graph.channel_graph import ChannelGraph, ChannelGroup, Member
from sparsify.testing import models
from sparsify.testing.oracle import check_exactness, randomize_, soft_zero_

TOL = 1e-9


@dataclass(frozen=True)
class Expect:
    prunable: int  # prunable groups
    pruned: int  # groups the oracle prunes (the exact ones)
    pruned_keep_bias: int | None  # … when biases are kept (None: pruning must refuse, inexact)


EXPECT = {
    "residual_cnn": Expect(4, 4, 1),
    "concat_net": Expect(2, 2, 1),
    "grouped_conv_net": Expect(3, 3, 3),
    "shufflenet": Expect(4, 4, 4),
    "module_shuffle_net": Expect(3, 3, 3),
    "se_net": Expect(4, 4, 4),
    "flatten_net": Expect(2, 2, 2),
    "functional_net": Expect(1, 1, 0),
    "conv1d_net": Expect(2, 2, 2),
    "conv3d_net": Expect(2, 2, 2),
    "decoder": Expect(2, 2, 0),
    "text_mlp": Expect(2, 2, 2),
    "mlp_block": Expect(2, 1, 1),
    "unknown_op_net": Expect(2, 2, 2),
    "transformer_block": Expect(1, 1, 1),
    "tied_lm": Expect(1, 1, 1),
    "shared_conv_net": Expect(1, 1, None),
    "split_net": Expect(1, 1, 1),
    "flatten_concat_net": Expect(1, 1, 1),
    "channel_reduce_net": Expect(2, 2, 0),
}


_KNOWN: dict = {}
_ORACLE_CASES = [pytest.param(name, keep_bias, id=f"{name}-{'keep_bias' if keep_bias else 'zero_bias'}",
                              marks=_KNOWN.get((name, keep_bias), ()))
                 for name in sorted(models.MODELS) for keep_bias in (False, True)]


def test_every_model_has_expectations() -> None:
    assert set(EXPECT) == set(models.MODELS)
    for name, builder in models.MODELS.items():
        model, _ = builder()
        assert type(model).__doc__, f"{name}: the model class must say what it exercises"


def _graph(name: str, **kwargs: object) -> ChannelGraph:
    model, x = models.MODELS[name](torch.float64, **kwargs)
    return build_channel_graph(model, x)


def _group_of(cg: ChannelGraph, tensor: str, dim: int | None = None, role: str | None = None) -> ChannelGroup:
    """The group that slices ``tensor`` (dim ``dim``, with ``role``)."""
    found = [g for g in cg.groups if any(m.tensor == tensor and dim in (None, m.dim) and role in (None, m.role)
                                         for m in g.members)]
    assert len(found) == 1, f"{tensor} dim {dim} role {role}: in groups {[g.name for g in found]}"
    return found[0]


def _member(group: ChannelGroup, tensor: str, dim: int) -> Member:
    return next(m for m in group.members if m.tensor == tensor and m.dim == dim)


# ----- the oracle on every model -----------------------------------------------------------------
@pytest.mark.parametrize(("name", "keep_bias"), _ORACLE_CASES)
def test_oracle(name: str, keep_bias: bool) -> None:
    model, x = models.MODELS[name](torch.float64)
    randomize_(model)
    expect = EXPECT[name]
    if keep_bias and expect.pruned_keep_bias is None:
        with pytest.raises(InexactPruneError):
            check_exactness(model, x, keep_bias=True)
        return
    result = check_exactness(model, x, keep_bias=keep_bias)
    assert len(result.graph.prunable_groups()) == expect.prunable
    assert result.groups_pruned == (expect.pruned_keep_bias if keep_bias else expect.pruned)
    assert result.max_abs_diff <= TOL
    if result.groups_pruned:
        assert result.report.params_after < result.report.params_before


# ----- 1. residual CNN ---------------------------------------------------------------------------
def test_residual_adds_tie_each_stage_into_one_group() -> None:
    cg = _graph("residual_cnn")
    stage1 = _group_of(cg, "stem.0.weight", 0)
    assert stage1.prunable and stage1.width == 8
    assert {"stem.0", "layer1.conv2", "layer1.bn2", "layer2.conv1", "layer2.downsample.0"} <= set(stage1.modules())
    stage2 = _group_of(cg, "layer2.conv2.weight", 0)
    assert stage2 is _group_of(cg, "layer2.downsample.0.weight", 0) is _group_of(cg, "fc.weight", 1)
    assert stage2.prunable and stage2.width == 12
    assert _group_of(cg, "layer1.conv1.weight", 0).prunable
    assert not _group_of(cg, "fc.weight", 0).prunable  # the logits


# ----- 2. concatenation --------------------------------------------------------------------------
def test_concat_reused_features_are_the_same_structures_at_both_offsets() -> None:
    cg = _graph("concat_net")
    g = _group_of(cg, "stem.0.weight", 0)
    assert g.prunable and g.width == 6 + 12 + 4
    for producer in ("branch_a.0", "branch_b2.0", "branch_c", "dense.0"):
        assert _group_of(cg, f"{producer}.weight", 0) is g
    head = _member(g, "head_bn.weight", 0).structure_of
    dense_in = _member(g, "dense.0.weight", 1).structure_of
    stem = _member(g, "stem.0.weight", 0).structure_of
    np.testing.assert_array_equal(head[:18], dense_in)  # cat([s, inception]) ⊂ cat([s, inception, dense])
    np.testing.assert_array_equal(head[:6], stem)
    assert len(np.unique(head)) == 22


# ----- 3. grouped convolutions -------------------------------------------------------------------
def test_grouped_depthwise_and_group_norm_structures() -> None:
    cg = _graph("grouped_conv_net")
    grouped = _group_of(cg, "grouped.0.weight", 0)
    assert grouped.width == 4  # one structure per conv group
    np.testing.assert_array_equal(_member(grouped, "grouped.0.weight", 0).structure_of, np.repeat(np.arange(4), 4))
    dw = _group_of(cg, "dw_mult.weight", 0)
    assert dw is _group_of(cg, "pw1.0.weight", 0) is _group_of(cg, "gn.weight", 0)
    assert dw.width == 8  # a GroupNorm group (4 channels) = 2 inputs of the ×2 depthwise conv
    np.testing.assert_array_equal(_member(dw, "dw_mult.weight", 0).structure_of, np.repeat(np.arange(8), 4))
    np.testing.assert_array_equal(_member(dw, "dw.0.weight", 0).structure_of, np.repeat(np.arange(8), 2))
    assert _group_of(cg, "inorm.weight", 0).width == 8


def test_grouped_conv_attributes_follow_pruning() -> None:
    model, x = models.grouped_conv_net(torch.float64)
    randomize_(model)
    result = check_exactness(model, x)
    assert result.max_abs_diff <= TOL
    assert model.grouped[0].groups == 2 and model.grouped[0].in_channels == model.grouped[0].out_channels == 8
    assert model.dw[0].groups == model.dw[0].out_channels == 8
    assert (model.dw_mult.groups, model.dw_mult.out_channels) == (8, 16)
    assert (model.gn.num_groups, model.gn.num_channels) == (4, 16)
    assert model.inorm.num_features == 4


# ----- 4. ShuffleNet -----------------------------------------------------------------------------
def test_channel_shuffle_ops_remove_whole_shuffle_rows() -> None:
    cg = _graph("module_shuffle_net")
    g1 = _group_of(cg, "conv1.0.weight", 0)
    assert g1.prunable and g1.width == 4  # nn.ChannelShuffle(3) on 12 channels
    np.testing.assert_array_equal(_member(g1, "conv1.0.weight", 0).structure_of, np.tile(np.arange(4), 3))
    g2 = _group_of(cg, "conv2.0.weight", 0)
    assert g2.prunable and g2.width == 3  # torch.channel_shuffle(·, 2) on 6 channels
    cg = _graph("shufflenet")
    assert _group_of(cg, "stem.0.weight", 0) is _group_of(cg, "unit2.branch.3.0.weight", 0)
    assert _group_of(cg, "unit1.branch.0.0.weight", 0).prunable


# ----- 5. squeeze-excite -------------------------------------------------------------------------
def test_squeeze_excite_gate_joins_the_gated_channels() -> None:
    cg = _graph("se_net")
    assert _group_of(cg, "se1.fc2.weight", 0) is _group_of(cg, "stem.0.weight", 0)
    assert _group_of(cg, "se2.fc2.weight", 0) is _group_of(cg, "pw.0.weight", 0)
    for squeeze in ("se1.fc1.weight", "se2.fc1.weight"):
        g = _group_of(cg, squeeze, 0)
        assert g.prunable and g.exact


# ----- 6. flatten with spatial extent ------------------------------------------------------------
@pytest.mark.parametrize("how", ["flatten", "view", "module"])
def test_flatten_merge_gives_each_channel_its_spatial_columns(how: str) -> None:
    cg = _graph("flatten_net", how=how)
    g = _group_of(cg, "conv.0.weight", 0)
    assert g.prunable and g.width == 6
    fc1 = [m for m in g.members if m.tensor == "fc1.weight"]
    assert len(fc1) == 1 and fc1[0].dim == 1 and fc1[0].derived_from
    np.testing.assert_array_equal(fc1[0].structure_of, np.repeat(np.arange(6), 16))
    for keep_bias in (False, True):
        model, x = models.flatten_net(torch.float64, how=how)
        result = check_exactness(randomize_(model), x, keep_bias=keep_bias)
        assert result.max_abs_diff <= TOL and result.groups_pruned == 2


def test_two_flattened_maps_concatenated_are_a_barrier() -> None:
    cg = _graph("flatten_concat_net")
    for branch in ("a.0.weight", "b.0.weight"):
        g = _group_of(cg, branch, 0)
        assert not g.prunable and "flatten" in g.why_not()
    assert _group_of(cg, "fc1.weight", 0).prunable


# ----- 7. functional model -----------------------------------------------------------------------
def test_functional_parameters_are_members_and_kernel_dims_are_not() -> None:
    cg = _graph("functional_net")
    g = _group_of(cg, "conv1_weight", 0)
    assert g.prunable and g.width == 8 + 6
    roles = {(m.tensor, m.dim): m.role for m in g.members}
    assert roles[("layer_scale", 0)] == roles[("pos_embed", 0)] == "value"
    assert roles[("bn_mean", 0)] == roles[("bn_var", 0)] == "stat"
    assert roles[("bn_weight", 0)] == "scale" and roles[("conv2_weight", 1)] == "in"
    assert roles[("fc_weight", 1)] == "in" and roles[("conv2_weight", 0)] == "out"
    for d in (2, 3):
        kernel = _group_of(cg, "conv1_weight", d)
        assert not kernel.prunable and "conv2d" in kernel.why_not()


# ----- 8. 1-d, 3-d and transposed convolutions ---------------------------------------------------
def test_transposed_conv_members() -> None:
    cg = _graph("decoder")
    g = _group_of(cg, "up1.weight", 1)
    assert g.prunable and g.width == 6
    assert _member(g, "up1.weight", 1).role == "out" and _member(g, "up2.weight", 0).role == "in"
    assert _group_of(cg, "enc.0.weight", 0) is _group_of(cg, "up1.weight", 0)
    assert not _group_of(cg, "up2.weight", 1).prunable  # the output image


# ----- 9. text -----------------------------------------------------------------------------------
def test_embedding_dim_is_prunable() -> None:
    cg = _graph("text_mlp")
    g = _group_of(cg, "embed.weight", 1)
    assert g.prunable and g.width == 12 and g is _group_of(cg, "fc1.weight", 1)
    assert _member(g, "embed.weight", 1).role == "out"


# ----- 10. transformer MLP -----------------------------------------------------------------------
def test_layer_norm_residual_is_prunable_but_inexact() -> None:
    cg = _graph("mlp_block")
    hidden = _group_of(cg, "mlp.0.weight", 0)
    assert hidden.prunable and hidden.exact and hidden.width == 32
    residual = _group_of(cg, "norm1.weight", 0)
    assert residual is _group_of(cg, "embed.weight", 0) is _group_of(cg, "mlp.2.weight", 0)
    assert residual.prunable and not residual.exact
    assert any("LayerNorm" in reason for reason in residual.inexact)
    model = cg.model
    with pytest.raises(InexactPruneError, match="allow_inexact"):
        prune_channels(cg, {residual.id: [0, 1]})
    assert model.embed.out_features == 16  # refused, untouched


def test_layer_norm_residual_prunes_when_allowed() -> None:
    model, x = models.mlp_block(torch.float64)
    cg = build_channel_graph(model, x)
    residual = _group_of(cg, "norm1.weight", 0)
    soft_zero_(model, cg.groups, {residual.id: np.array([0, 1])})
    prune_channels(cg, {residual.id: [0, 1]}, allow_inexact=True)
    assert model.norm1.normalized_shape == (14,) and model.head.in_features == 14
    assert model(x).shape == (2, 5, 4)


# ----- 11. an op without a rule ------------------------------------------------------------------
@pytest.mark.parametrize(("producer", "op"), [("conv2", "fft_rfft"), ("conv3", "scaled_square")])
def test_op_without_rule_is_a_barrier_that_says_how_to_fix_it(producer: str, op: str) -> None:
    cg = _graph("unknown_op_net")
    g = _group_of(cg, f"{producer}.weight", 0)
    assert not g.prunable
    assert op in g.why_not() and "register_op_rule" in g.why_not()
    assert _group_of(cg, "conv1.0.weight", 0).prunable and _group_of(cg, "fc1.weight", 0).prunable


# ----- 12. hand-written attention ----------------------------------------------------------------
def test_attention_heads_are_a_barrier_but_the_mlp_is_not() -> None:
    cg = _graph("transformer_block")
    qkv = _group_of(cg, "attn.qkv.weight", 0)
    assert not qkv.prunable and qkv.why_not()
    assert any("attention heads" in reason for reason in qkv.blocked)
    hidden = _group_of(cg, "mlp.0.weight", 0)
    assert hidden.prunable and hidden.exact and hidden.width == 20
    residual = _group_of(cg, "attn.proj.weight", 0)
    assert residual is _group_of(cg, "attn.qkv.weight", 1) is _group_of(cg, "norm2.weight", 0)
    # view(b, n, heads, c // heads) and reshape(b, n, c) read c from the block input: pruning the residual
    # stream alone would break them (issue #21), so it is a barrier that names the size read
    assert not residual.prunable and not residual.exact
    assert any("the shape of another tensor" in reason for reason in residual.blocked)


# ----- regressions -------------------------------------------------------------------------------
@pytest.mark.parametrize("alias", [True, False], ids=["aliased", "functional"])
def test_tied_parameter_is_one_member_that_makes_the_channels(alias: bool) -> None:
    cg = _graph("tied_lm", alias=alias)
    g = _group_of(cg, "embed.weight", 1)
    assert g is _group_of(cg, "fc.weight", 0) and g.prunable
    assert _member(g, "embed.weight", 1).role == "out"  # zeroing it zeroes the embedding channel
    named_head = any(m.tensor.startswith("head.") for m in cg.facts.members)
    assert named_head is not alias  # a tied tensor goes by its first name, embed.weight


@pytest.mark.parametrize("keep_bias", [False, True], ids=["zero_bias", "keep_bias"])
def test_tensor_that_makes_and_consumes_a_group_prunes_exactly(keep_bias: bool) -> None:
    model, x = models.tied_lm(torch.float64, alias=False)
    result = check_exactness(randomize_(model), x, keep_bias=keep_bias)
    assert result.groups_pruned == 1 and result.max_abs_diff <= TOL
    assert model.embed.weight.shape == (11, 4) and model.head.weight.shape == (11, 4)


def test_tied_parameter_stays_tied_after_pruning() -> None:
    model, x = models.tied_lm(torch.float64)
    result = check_exactness(randomize_(model), x)
    assert result.max_abs_diff <= TOL
    assert model.head.weight is model.embed.weight and model.embed.weight.shape == (11, 4)


def test_constants_reaching_a_sum_or_activation_product_are_refused() -> None:
    """A sum over channels and an activation × activation matmul have no bias to absorb constants."""
    model, x = models.channel_reduce_net(torch.float64)
    randomize_(model).eval()
    cg = build_channel_graph(model, x)
    sink_groups = [g for g in cg.prunable_groups() if g.sinks]
    assert len(sink_groups) == 2
    for g in sink_groups:
        m = copy.deepcopy(model)
        cg = build_channel_graph(m, x)
        plan = {g.id: np.array([0, 1])}
        soft_zero_(m, cg.groups, plan, keep_bias=True)
        with pytest.raises(InexactPruneError, match="non-zero values"):
            prune_channels(cg, plan)
        soft_zero_(m, cg.groups, plan, keep_bias=False)  # exact zeros pass through a sum exactly
        prune_channels(cg, plan)


def test_module_called_twice_folds_only_constants_both_calls_share() -> None:
    model, x = models.shared_conv_net(torch.float64)
    randomize_(model)
    with pytest.raises(InexactPruneError, match="called at 2 places"):
        check_exactness(model, x, keep_bias=True)
    assert model.shared.weight.shape == (8, 8, 1, 1)  # refused, untouched


def test_split_with_hard_coded_size_is_a_barrier() -> None:
    cg = _graph("split_net")
    glu = _group_of(cg, "glu_in.weight", 0)
    assert glu.prunable and glu.width == 6
    np.testing.assert_array_equal(_member(glu, "glu_in.weight", 0).structure_of, np.tile(np.arange(6), 2))
    fixed = _group_of(cg, "fixed_in.weight", 0)
    assert not fixed.prunable and "hard-coded" in fixed.why_not()
