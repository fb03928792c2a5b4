"""sparsify: structured sparsity as unstructured sparsity on importance vectors.

Trace a model into a channel-dependency graph, group coupled channels, and remove chosen channels
physically without changing what the network computes.
"""

from importlib.metadata import PackageNotFoundError, version

from sparsify import speed as speed
from sparsify.adapters import ActivationConfig as ActivationConfig
from sparsify.adapters import AdapterConfig as AdapterConfig
from sparsify.adapters import BNGammaConfig as BNGammaConfig
from sparsify.adapters import FilterNormConfig as FilterNormConfig
from sparsify.adapters import HeadsConfig as HeadsConfig
from sparsify.adapters import RNNUnitsConfig as RNNUnitsConfig
from sparsify.adapters import list_adapters as list_adapters
from sparsify.adapters import register_adapter as register_adapter
from sparsify.batchnorm import recalibrate_batchnorm as recalibrate_batchnorm
from sparsify.config import SparsifierConfig as SparsifierConfig
from sparsify.deploy import deploy as deploy
from sparsify.errors import InexactPruneError as InexactPruneError
from sparsify.errors import PruneError as PruneError
from sparsify.errors import SparsifyError as SparsifyError
from sparsify.errors import TraceError as TraceError
from sparsify.graph.channel_graph import ChannelGraph as ChannelGraph
from sparsify.graph.channel_graph import ChannelGroup as ChannelGroup
from sparsify.graph.channel_graph import build_channel_graph as build_channel_graph
from sparsify.graph.rules import register_op_rule as register_op_rule
from sparsify.graph.trace import register_autowrap_function as register_autowrap_function
from sparsify.graph.trace import register_leaf_module as register_leaf_module
from sparsify.io import load as load
from sparsify.io import save as save
from sparsify.policies import GMPConfig as GMPConfig
from sparsify.policies import PolicyConfig as PolicyConfig
from sparsify.policies import SlimmingConfig as SlimmingConfig
from sparsify.policies import STRConfig as STRConfig
from sparsify.policies import list_policies as list_policies
from sparsify.policies import register_policy as register_policy
from sparsify.prune.attributes import register_attribute_sync as register_attribute_sync
from sparsify.prune.surgery import PruneReport as PruneReport
from sparsify.prune.surgery import prune_channels as prune_channels
from sparsify.sparsifier import Sparsifier as Sparsifier

try:
    __version__ = version("sparsify-structured")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"

__all__ = [
    "ActivationConfig",
    "AdapterConfig",
    "BNGammaConfig",
    "ChannelGraph",
    "ChannelGroup",
    "FilterNormConfig",
    "GMPConfig",
    "HeadsConfig",
    "InexactPruneError",
    "PolicyConfig",
    "PruneError",
    "PruneReport",
    "RNNUnitsConfig",
    "STRConfig",
    "SlimmingConfig",
    "Sparsifier",
    "SparsifierConfig",
    "SparsifyError",
    "TraceError",
    "__version__",
    "build_channel_graph",
    "deploy",
    "list_adapters",
    "list_policies",
    "load",
    "prune_channels",
    "register_adapter",
    "register_attribute_sync",
    "register_autowrap_function",
    "register_leaf_module",
    "register_op_rule",
    "register_policy",
    "save",
    "speed",
]
