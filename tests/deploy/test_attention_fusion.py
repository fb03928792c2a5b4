"""deploy's q/k/v fusion: one GEMM per explicit attention, the same outputs, pruned heads kept."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from sparsify.deploy import deploy
from sparsify.deploy.attention import FusedSelfAttention, fusable, fuse_attention_projections_
from sparsify.errors import SparsifyError
from sparsify.nn import ExplicitMultiheadAttention, explicit_multihead_attention_
from sparsify.testing.oracle import check_exactness, randomize_


@pytest.mark.parametrize("batch_first", [True, False])
def test_fused_projections_compute_what_the_explicit_module_does(batch_first: bool) -> None:
    mha = nn.MultiheadAttention(16, 4, batch_first=batch_first).double().eval()
    explicit = explicit_multihead_attention_(nn.Sequential(mha))[0]
    fused = FusedSelfAttention(explicit)
    assert fused.qkv_proj.weight.shape == (48, 16) and fused.sizes == (16, 16, 16)
    x, kv = torch.randn(2, 5, 16, dtype=torch.float64), torch.randn(2, 7, 16, dtype=torch.float64)
    if not batch_first:
        x, kv = x.transpose(0, 1), kv.transpose(0, 1)
    self_masks = {"key_padding_mask": torch.rand(2, 5) > 0.7, "attn_mask": torch.rand(5, 5) > 0.8}
    assert (fused(x, x, x, **self_masks)[0] - explicit(x, x, x, **self_masks)[0]).abs().max() <= 1e-12
    cross = {"key_padding_mask": torch.rand(2, 7) > 0.7}
    assert (fused(x, kv, kv, **cross)[0] - explicit(x, kv, kv, **cross)[0]).abs().max() <= 1e-12


def test_deploy_fuses_a_heads_pruned_vit_and_keeps_its_outputs(tv: Any) -> None:
    vit = tv.models.VisionTransformer(image_size=16, patch_size=8, num_layers=2, num_heads=4, hidden_dim=16,
                                      mlp_dim=24, num_classes=3)
    model, x = randomize_(vit.double().eval()), torch.randn(2, 3, 16, 16, dtype=torch.float64)
    explicit_multihead_attention_(model)
    check_exactness(model, x, keep_bias=True)  # prunes heads in place
    heads = [m.num_heads for m in model.modules() if isinstance(m, ExplicitMultiheadAttention)]
    assert heads and min(heads) < 4
    deployed = deploy(model, x, channels_last=False)
    fused = [m for m in deployed.modules() if isinstance(m, FusedSelfAttention)]
    assert len(fused) == 2 and len(deployed.sparsify_attention) == 2
    assert [m.num_heads for m in fused] == heads and [m.qkv_proj.out_features for m in fused] == [
        3 * h * m.head_dim for h, m in zip(heads, fused, strict=True)]
    with torch.no_grad():
        assert (deployed(x) - model(x)).abs().max() <= 1e-10
    assert any(isinstance(m, ExplicitMultiheadAttention) for m in model.modules())  # the model itself untouched
    kept = deploy(model, x, channels_last=False, fuse_attention=False)
    assert not any(isinstance(m, FusedSelfAttention) for m in kept.modules()) and kept.sparsify_attention == []


def test_projections_of_different_input_widths_stay_apart() -> None:
    explicit = explicit_multihead_attention_(nn.Sequential(nn.MultiheadAttention(8, 2, batch_first=True)))[0]
    explicit.k_proj = nn.Linear(6, 8)
    holder = nn.Sequential(explicit)
    assert not fusable(explicit) and fuse_attention_projections_(holder) == [] and holder[0] is explicit
    with pytest.raises(SparsifyError, match="different input widths"):
        FusedSelfAttention(explicit)


def test_a_deployed_vit_pruned_again_stays_exact(tv: Any) -> None:
    """The fused projection's fixed split sizes must not be broken by pruning the deployed model: the oracle
    (soft-zero, prune, compare) holds on it."""
    vit = tv.models.VisionTransformer(image_size=16, patch_size=8, num_layers=2, num_heads=4, hidden_dim=16,
                                      mlp_dim=24, num_classes=3)
    model, x = randomize_(vit.double().eval()), torch.randn(2, 3, 16, 16, dtype=torch.float64)
    deployed = deploy(explicit_multihead_attention_(model), x, channels_last=False)
    result = check_exactness(deployed, x)
    assert result.max_abs_diff <= 1e-10 and result.report.widths
    fused = [m for m in deployed.modules() if isinstance(m, FusedSelfAttention)]
    assert all(m.qkv_proj.out_features == sum(m.sizes) for m in fused)
