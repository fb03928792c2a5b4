"""sparsify: structured sparsity as unstructured sparsity on importance vectors.

Trace a model into a channel-dependency graph, group coupled channels, and remove chosen channels
physically without changing what the network computes.

The names here are the user tier: train with a :class:`Sparsifier` (configs for every built-in adapter
and policy), prune with the graph API or a one-shot plan, save and load. Extension points (registries,
base classes, graph types) are in :mod:`sparsify.extend`; subpackages :mod:`sparsify.hf`,
:mod:`sparsify.deploy`, :mod:`sparsify.measure` and :mod:`sparsify.testing` hold the rest.
"""

from sparsify import extend as extend  # registers the built-in adapters, policies, op rules and module types
from sparsify._version import __version__ as __version__
from sparsify.adapters import ActivationConfig as ActivationConfig
from sparsify.adapters import BNGammaConfig as BNGammaConfig
from sparsify.adapters import FilterNormConfig as FilterNormConfig
from sparsify.adapters import HeadsConfig as HeadsConfig
from sparsify.adapters import LowRankConfig as LowRankConfig
from sparsify.adapters import RNNUnitsConfig as RNNUnitsConfig
from sparsify.adapters import TorchPruningConfig as TorchPruningConfig
from sparsify.config import SparsifierConfig as SparsifierConfig
from sparsify.errors import SparsifyError as SparsifyError
from sparsify.graph.channel_graph import build_channel_graph as build_channel_graph
from sparsify.io import load as load
from sparsify.io import save as save
from sparsify.oneshot import apply_plan as apply_plan
from sparsify.oneshot import make_plan as make_plan
from sparsify.policies import GMPConfig as GMPConfig
from sparsify.policies import SlimmingConfig as SlimmingConfig
from sparsify.policies import STRConfig as STRConfig
from sparsify.prune.batchnorm import recalibrate_batchnorm as recalibrate_batchnorm
from sparsify.prune.surgery import PruneReport as PruneReport
from sparsify.prune.surgery import prune_channels as prune_channels
from sparsify.sparsifier import PruneResult as PruneResult
from sparsify.sparsifier import Sparsifier as Sparsifier

__all__ = [
    "ActivationConfig",
    "BNGammaConfig",
    "FilterNormConfig",
    "GMPConfig",
    "HeadsConfig",
    "LowRankConfig",
    "PruneReport",
    "PruneResult",
    "RNNUnitsConfig",
    "STRConfig",
    "SlimmingConfig",
    "Sparsifier",
    "SparsifierConfig",
    "SparsifyError",
    "TorchPruningConfig",
    "__version__",
    "apply_plan",
    "build_channel_graph",
    "load",
    "make_plan",
    "prune_channels",
    "recalibrate_batchnorm",
    "save",
]
