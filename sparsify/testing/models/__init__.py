"""Small hand-built models, each exercising a few op rules or a topology the channel graph must get right.

Every builder returns ``(model, example_input)`` in the requested dtype (token ids stay int64). The
models are tiny (a few thousand parameters, 8×8 images, batch 2) so that the exactness oracle runs on
each of them in well under a second. ``MODELS`` maps a name to each builder. The builders live by
topology in ``cnn``, ``branches``, ``layout``, ``ops`` and ``tokens``; every one is importable from here.
``fused_roles`` and ``attention_variants`` hold issue #21's sweep of the silent-wrong class (not in ``MODELS``:
tests/graph/rules/test_silent_wrong_class.py runs them under fx and torch.export).
"""

from __future__ import annotations

from collections.abc import Callable

from sparsify.testing.models import attention_variants as attention_variants
from sparsify.testing.models import fused_roles as fused_roles
from sparsify.testing.models.branches import ChannelReduceNet as ChannelReduceNet
from sparsify.testing.models.branches import ConcatNet as ConcatNet
from sparsify.testing.models.branches import SENet as SENet
from sparsify.testing.models.branches import SplitNet as SplitNet
from sparsify.testing.models.branches import SqueezeExcite as SqueezeExcite
from sparsify.testing.models.branches import channel_reduce_net as channel_reduce_net
from sparsify.testing.models.branches import concat_net as concat_net
from sparsify.testing.models.branches import se_net as se_net
from sparsify.testing.models.branches import split_net as split_net
from sparsify.testing.models.cnn import BasicBlock as BasicBlock
from sparsify.testing.models.cnn import Conv1dNet as Conv1dNet
from sparsify.testing.models.cnn import Conv3dNet as Conv3dNet
from sparsify.testing.models.cnn import Decoder as Decoder
from sparsify.testing.models.cnn import GroupedConvNet as GroupedConvNet
from sparsify.testing.models.cnn import ResidualCNN as ResidualCNN
from sparsify.testing.models.cnn import SharedConvNet as SharedConvNet
from sparsify.testing.models.cnn import conv1d_net as conv1d_net
from sparsify.testing.models.cnn import conv3d_net as conv3d_net
from sparsify.testing.models.cnn import decoder as decoder
from sparsify.testing.models.cnn import grouped_conv_net as grouped_conv_net
from sparsify.testing.models.cnn import residual_cnn as residual_cnn
from sparsify.testing.models.cnn import shared_conv_net as shared_conv_net
from sparsify.testing.models.common import Example as Example
from sparsify.testing.models.layout import FlattenConcatNet as FlattenConcatNet
from sparsify.testing.models.layout import FlattenNet as FlattenNet
from sparsify.testing.models.layout import ModuleShuffleNet as ModuleShuffleNet
from sparsify.testing.models.layout import ShuffleNet as ShuffleNet
from sparsify.testing.models.layout import ShuffleUnit as ShuffleUnit
from sparsify.testing.models.layout import channel_shuffle as channel_shuffle
from sparsify.testing.models.layout import flatten_concat_net as flatten_concat_net
from sparsify.testing.models.layout import flatten_net as flatten_net
from sparsify.testing.models.layout import module_shuffle_net as module_shuffle_net
from sparsify.testing.models.layout import shufflenet as shufflenet
from sparsify.testing.models.ops import FunctionalNet as FunctionalNet
from sparsify.testing.models.ops import UnknownOpNet as UnknownOpNet
from sparsify.testing.models.ops import functional_net as functional_net
from sparsify.testing.models.ops import scaled_square as scaled_square
from sparsify.testing.models.ops import unknown_op_net as unknown_op_net
from sparsify.testing.models.tokens import Attention as Attention
from sparsify.testing.models.tokens import FusedQKVSliceNet as FusedQKVSliceNet
from sparsify.testing.models.tokens import MLPBlock as MLPBlock
from sparsify.testing.models.tokens import TextMLP as TextMLP
from sparsify.testing.models.tokens import TiedLM as TiedLM
from sparsify.testing.models.tokens import TransformerBlock as TransformerBlock
from sparsify.testing.models.tokens import fused_qkv_slice_net as fused_qkv_slice_net
from sparsify.testing.models.tokens import mlp_block as mlp_block
from sparsify.testing.models.tokens import text_mlp as text_mlp
from sparsify.testing.models.tokens import tied_lm as tied_lm
from sparsify.testing.models.tokens import transformer_block as transformer_block

MODELS: dict[str, Callable[..., Example]] = {
    "residual_cnn": residual_cnn,
    "concat_net": concat_net,
    "grouped_conv_net": grouped_conv_net,
    "shufflenet": shufflenet,
    "module_shuffle_net": module_shuffle_net,
    "se_net": se_net,
    "flatten_net": flatten_net,
    "flatten_concat_net": flatten_concat_net,
    "functional_net": functional_net,
    "conv1d_net": conv1d_net,
    "conv3d_net": conv3d_net,
    "decoder": decoder,
    "text_mlp": text_mlp,
    "mlp_block": mlp_block,
    "unknown_op_net": unknown_op_net,
    "transformer_block": transformer_block,
    "tied_lm": tied_lm,
    "shared_conv_net": shared_conv_net,
    "split_net": split_net,
    "channel_reduce_net": channel_reduce_net,
}
