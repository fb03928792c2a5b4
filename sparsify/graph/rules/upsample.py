"""ATen resampling ops (torch.export graphs of ``F.interpolate``): nearest, (bi/tri)linear and bicubic
upsampling resample every channel on its own, with weights that sum to one: a zero channel stays zero and
a constant channel stays the same constant, so batch and channel dims pass through as for a pool and the
spatial dims are new (``aten.upsample_nearest2d`` is in the ``aten_pool`` rule already)."""

from __future__ import annotations

import torch

from sparsify.graph.op_rules import register_op_rule
from sparsify.graph.rules.aten import _overloads
from sparsify.graph.rules.layers import pool

aten = torch.ops.aten

register_op_rule("aten_upsample", pool, functions=_overloads(
    aten.upsample_nearest1d, aten.upsample_nearest3d, aten._upsample_nearest_exact1d,
    aten._upsample_nearest_exact2d, aten._upsample_nearest_exact3d, aten.upsample_linear1d,
    aten.upsample_bilinear2d, aten.upsample_trilinear3d, aten.upsample_bicubic2d))
