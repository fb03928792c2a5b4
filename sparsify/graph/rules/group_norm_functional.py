"""F.group_norm in fx graphs: the call a GroupNorm subclass makes in its own forward (timm's GroupNorm1,
``F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)``; fx traces through subclasses
defined outside ``torch.nn``). Its arguments are those of aten.group_norm, so the rule is the same: whole
groups are structures when weight and bias are an affine nn.GroupNorm's own and the group count is the
module's (re-synced after pruning); any other call is a barrier that says why."""

from __future__ import annotations

import torch.nn.functional as F

from sparsify.graph.op_rules import register_op_rule
from sparsify.graph.rules.aten import group_norm

register_op_rule("group_norm_functional", group_norm, functions=(F.group_norm,))
