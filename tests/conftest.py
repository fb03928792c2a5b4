"""Shared fixtures."""

from __future__ import annotations

import os
from types import ModuleType

import pytest
import torch

from sparsify._compat import import_torchvision

try:  # transformers imports torchvision: make a CUDA torchvision build importable on CPU torch first
    import_torchvision()
except ModuleNotFoundError:
    pass

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)  # one process per core: OpenMP threads spinning against each other are slow


@pytest.fixture(scope="session")
def tv() -> ModuleType:
    """torchvision, imported so that a CUDA build also works on a CPU-only torch."""
    return import_torchvision()


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
