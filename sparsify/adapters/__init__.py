"""Adapters: prunable structures → importance vectors. Built-ins register themselves on import."""

from sparsify.adapters import bn_gamma, filter_norm, low_rank  # noqa: F401
from sparsify.adapters.activation import ActivationConfig
from sparsify.adapters.base import (
    ADAPTERS,
    Adapter,
    AdapterConfig,
    ImportanceVector,
    list_adapters,
    make_adapter,
    register_adapter,
)
from sparsify.adapters.bn_gamma import BNGammaConfig
from sparsify.adapters.filter_norm import FilterNormConfig
from sparsify.adapters.fluctuation import FluctuationConfig
from sparsify.adapters.heads import HeadsConfig
from sparsify.adapters.low_rank import LowRankConfig
from sparsify.adapters.rnn_units import RNNUnitsConfig
from sparsify.adapters.taylor import TaylorConfig
from sparsify.adapters.torch_pruning import TorchPruningConfig

__all__ = ["ADAPTERS", "ActivationConfig", "Adapter", "AdapterConfig", "BNGammaConfig", "FilterNormConfig",
           "FluctuationConfig", "HeadsConfig", "ImportanceVector",
           "LowRankConfig", "RNNUnitsConfig", "TaylorConfig", "TorchPruningConfig", "list_adapters", "make_adapter",
           "register_adapter"]
