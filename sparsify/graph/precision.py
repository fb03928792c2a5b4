"""Where a traced model computes in a lower floating precision than its own (``x.float()`` inside a
float64 model). Pruning stays exact there, but reductions over a pruned width round differently in that
precision, so an exactness check must use that precision's tolerance, not its model's."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sparsify.graph.trace import TensorInfo, TracedModel

# Relative error (max |diff| / max |output|) that pruning may cause through rounding alone, by the lowest
# precision a model computes in: reductions over a narrower width sum in another order. float64 keeps the
# zoo's strict bound; float32 rounds at ~6e-8 a step, compounded over a deep model.
REL_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-5, torch.bfloat16: 1e-1, torch.float16: 1e-2}


@dataclass(frozen=True)
class LowerPrecision:
    """The lowest floating dtype a traced model computes in, below the dtype of its parameters."""

    dtype: torch.dtype
    node: str  # the first node whose output has that dtype
    model_dtype: torch.dtype

    @property
    def rel_tolerance(self) -> float:
        return REL_TOLERANCE.get(self.dtype, 1e-1)

    def describe(self) -> str:
        return (f"computes in {str(self.dtype).removeprefix('torch.')} inside a "
                f"{str(self.model_dtype).removeprefix('torch.')} model (first at node '{self.node}')")


def _model_dtype(model: nn.Module) -> torch.dtype | None:
    floats = [p.dtype for p in model.parameters() if p.is_floating_point()]
    return max(floats, key=lambda d: torch.finfo(d).bits) if floats else None


def _tensors(value: object) -> list[TensorInfo]:
    if isinstance(value, TensorInfo):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    return []


def lower_precision(traced: TracedModel) -> LowerPrecision | None:
    """The lowest floating precision below the model's that any traced node outputs, or ``None``."""
    model_dtype = _model_dtype(traced.model)
    if model_dtype is None:
        return None
    bits = torch.finfo(model_dtype).bits
    lowest: LowerPrecision | None = None
    for node in traced.graph.nodes:
        for t in _tensors(traced.values.get(node.name)):
            if not t.dtype.is_floating_point or t.dtype.is_complex or torch.finfo(t.dtype).bits >= bits:
                continue
            if lowest is None or torch.finfo(t.dtype).eps > torch.finfo(lowest.dtype).eps:
                lowest = LowerPrecision(t.dtype, node.name, model_dtype)
    return lowest
