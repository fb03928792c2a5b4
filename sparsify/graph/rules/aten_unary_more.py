"""More element-wise ATen ops, found by the Hugging Face coverage zoo (issue #21).

``expm1`` (the xIELU activation of Apertus), ``softplus`` (Mamba's step size), ``log1p`` and ``erf`` map
channel i of their input to channel i of their output, like the activations in ``aten_unary``;
``type_as(x, other)`` is a cast of ``x`` (``other`` gives only its dtype, so only ``x`` is coupled).
"""

from __future__ import annotations

import torch

from sparsify.graph.op_rules import register_op_rule
from sparsify.graph.rules.aten import _overloads
from sparsify.graph.rules.elementwise import unary

aten = torch.ops.aten

register_op_rule("aten_unary_more", unary, functions=_overloads(
    aten.expm1, aten.softplus, aten.log1p, aten.erf, aten.type_as))
