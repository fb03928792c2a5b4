"""Modules sparsify puts into models: low-rank layers, explicit attention, fused conv+ReLU, space-to-depth stems.

Each module type is registered where it is defined, in one ``register_module_type`` call (leaf, attribute
sync); the adapters (:mod:`sparsify.adapters`) and deploy passes (:mod:`sparsify.deploy`) use them.
"""

from sparsify.nn.attention import ExplicitMultiheadAttention as ExplicitMultiheadAttention
from sparsify.nn.attention import explicit_multihead_attention_ as explicit_multihead_attention_
from sparsify.nn.fused import ConvAddReLU as ConvAddReLU
from sparsify.nn.fused import ConvReLU as ConvReLU
from sparsify.nn.low_rank import LowRankConv2d as LowRankConv2d
from sparsify.nn.low_rank import LowRankLinear as LowRankLinear
from sparsify.nn.low_rank import factorize_ as factorize_
from sparsify.nn.low_rank import factorize_conv2d as factorize_conv2d
from sparsify.nn.low_rank import factorize_linear as factorize_linear
from sparsify.nn.stem import SpaceToDepth as SpaceToDepth
from sparsify.nn.stem import SpaceToDepthConv2d as SpaceToDepthConv2d

__all__ = [
    "ConvAddReLU",
    "ConvReLU",
    "ExplicitMultiheadAttention",
    "LowRankConv2d",
    "LowRankLinear",
    "SpaceToDepth",
    "SpaceToDepthConv2d",
    "explicit_multihead_attention_",
    "factorize_",
    "factorize_conv2d",
    "factorize_linear",
]
