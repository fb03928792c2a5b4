"""HF MaskFormer with a Swin backbone (issue #21, the coverage zoo's one oracle failure): Swin's
relative-position bias is ``table[index.view(-1)]`` with ``index`` an integer buffer. Its dims were a
prunable exact group (the gather did not declare its index tensor's dims); pruning it raised a size
mismatch in the bias view. They are the gather's selected positions, a barrier naming the op."""

from __future__ import annotations

import pytest
import torch

from sparsify import build_channel_graph
from sparsify.testing.oracle import check_exactness, randomize_

transformers = pytest.importorskip("transformers")


def _tiny_maskformer() -> torch.nn.Module:
    swin = transformers.SwinConfig(embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], window_size=2,
                                   image_size=64, patch_size=4)
    detr = transformers.DetrConfig(d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                                   decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, num_queries=4)
    config = transformers.MaskFormerConfig(backbone_config=swin, decoder_config=detr, fpn_feature_size=32,
                                           mask_feature_size=32, num_queries=4)
    torch.manual_seed(0)
    return transformers.MaskFormerModel(config).double().eval()


def test_maskformer_swin_index_buffers_are_barriers_and_the_rest_prunes_exactly() -> None:
    model = _tiny_maskformer()
    inputs = {"pixel_values": torch.randn(1, 3, 64, 64, dtype=torch.float64)}
    cg = build_channel_graph(model, inputs)
    index = [g for g in cg.groups if any(m.tensor.endswith("relative_position_index") for m in g.members)]
    assert index and not any(g.prunable for g in index), [(g.name, g.why_not()) for g in index]
    assert all("index.Tensor()" in g.why_not() for g in index), [g.why_not() for g in index]
    randomize_(model, 0)
    result = check_exactness(model, inputs, 0.5, 0)
    assert result.groups_pruned >= 5
    assert result.max_abs_diff <= 1e-9 * result.output_scale, (result.max_abs_diff, result.output_scale)
