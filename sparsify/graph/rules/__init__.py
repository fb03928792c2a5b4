"""Op rules: how each op couples the channels of its inputs, outputs and parameters.

Importing this package registers the built-in rules (the registry is ``sparsify.graph.op_rules``)."""

from sparsify.graph.op_rules import OP_RULES, OpRule, find_rule, list_op_rules, register_op_rule
from sparsify.graph.rules import (  # noqa: F401
    aten,
    aten_inplace,  # add_/mul_/... and hardtanh_ when no other reader sees the mutation; hardtanh
    aten_unary_more,  # expm1, softplus, log1p, erf, type_as (the HF coverage zoo)
    attention,  # SDPA and attention heads; wraps the matmul rule
    elementwise,
    gather,  # aten.index.Tensor, index_select, topk/sort: indexed dims blocked, the rest pass through
    group_norm_functional,  # F.group_norm inside a GroupNorm subclass (timm GroupNorm1)
    layers,
    layout,
    pad_aten,  # aten.pad, aten.constant_pad_nd
    pow,  # x ** p, torch.pow, Tensor.pow
    rnn,  # nn.RNN, nn.LSTM, nn.GRU hidden units
    rnn_cells,  # nn.LSTMCell, nn.GRUCell, nn.RNNCell (and aten cell ops), torch.stack, zeros
    structural,
    torchvision_ops,
    upsample,  # aten nearest / linear / cubic upsampling
)

__all__ = ["OP_RULES", "OpRule", "find_rule", "list_op_rules", "register_op_rule"]
