"""The extension tier: teach sparsify new importance vectors, policies, ops and module types.

Users of the training API need none of this; see docs/extending.md.
"""

from sparsify.adapters import Adapter as Adapter
from sparsify.adapters import AdapterConfig as AdapterConfig
from sparsify.adapters import ImportanceVector as ImportanceVector
from sparsify.adapters import list_adapters as list_adapters
from sparsify.adapters import register_adapter as register_adapter
from sparsify.graph.builder import OpContext as OpContext
from sparsify.graph.channel_graph import ChannelGraph as ChannelGraph
from sparsify.graph.channel_graph import ChannelGroup as ChannelGroup
from sparsify.graph.module_types import register_module_type as register_module_type
from sparsify.graph.rules import list_op_rules as list_op_rules
from sparsify.graph.rules import register_op_rule as register_op_rule
from sparsify.graph.trace import register_autowrap_function as register_autowrap_function
from sparsify.graph.trace import register_leaf_module as register_leaf_module
from sparsify.hf import cache as _hf_cache  # noqa: F401  (HF caches as pytrees when traced with use_cache on)
from sparsify.hf import repeated as _hf_repeated  # noqa: F401  (trace two decoder layers, replicate the rest)
from sparsify.hf import syncs as _hf_syncs  # noqa: F401  (Hugging Face module types, by dotted name)
from sparsify.policies import Policy as Policy
from sparsify.policies import PolicyConfig as PolicyConfig
from sparsify.policies import list_policies as list_policies
from sparsify.policies import register_policy as register_policy
from sparsify.policies.base import GroupView as GroupView
from sparsify.policies.base import PolicyContext as PolicyContext
from sparsify.prune.attributes import register_attribute_sync as register_attribute_sync

__all__ = [
    "Adapter",
    "AdapterConfig",
    "ChannelGraph",
    "ChannelGroup",
    "GroupView",
    "ImportanceVector",
    "OpContext",
    "Policy",
    "PolicyConfig",
    "PolicyContext",
    "list_adapters",
    "list_op_rules",
    "list_policies",
    "register_adapter",
    "register_attribute_sync",
    "register_autowrap_function",
    "register_leaf_module",
    "register_module_type",
    "register_op_rule",
    "register_policy",
]
