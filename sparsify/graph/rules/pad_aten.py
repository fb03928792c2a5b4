"""ATen padding (torch.export graphs of ``F.pad`` and of timm's 'same'-padded convolutions):
``aten.pad`` and ``aten.constant_pad_nd`` take ``(input, pad, ...)`` like F.pad, so the rule is the fx
``pad`` rule: padded dims are new, the others pass through."""

from __future__ import annotations

import torch

from sparsify.graph.op_rules import register_op_rule
from sparsify.graph.rules.aten import _overloads
from sparsify.graph.rules.layers import pad

aten = torch.ops.aten

register_op_rule("aten_pad", pad, functions=_overloads(aten.pad, aten.constant_pad_nd))
