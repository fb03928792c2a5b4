"""Op rules: how each op couples the channels of its inputs, outputs and parameters."""

from sparsify.graph.rules import aten, elementwise, layers, layout, structural, torchvision_ops  # noqa: F401
from sparsify.graph.rules.registry import OP_RULES, OpRule, find_rule, register_op_rule

__all__ = ["OP_RULES", "OpRule", "find_rule", "register_op_rule"]
