"""Make a (pruned) model ready for inference: BN folded, conv+bias+ReLU(+add) fused, one q/k/v GEMM per explicit
attention, channels_last, compiled."""

from sparsify.deploy.attention import FusedSelfAttention as FusedSelfAttention
from sparsify.deploy.attention import fuse_attention_projections_ as fuse_attention_projections_
from sparsify.deploy.fold_bn import find_conv_bn_pairs as find_conv_bn_pairs
from sparsify.deploy.fold_bn import fold_batchnorm as fold_batchnorm
from sparsify.deploy.fusion import find_conv_activations as find_conv_activations
from sparsify.deploy.fusion import fuse_conv_activations as fuse_conv_activations
from sparsify.deploy.pipeline import deploy as deploy
from sparsify.deploy.stem import space_to_depth_stems_ as space_to_depth_stems_

__all__ = [
    "FusedSelfAttention",
    "deploy",
    "find_conv_activations",
    "find_conv_bn_pairs",
    "fold_batchnorm",
    "fuse_attention_projections_",
    "fuse_conv_activations",
    "space_to_depth_stems_",
]
