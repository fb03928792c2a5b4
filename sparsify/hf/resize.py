"""Give Hugging Face layers new widths before loading a pruned checkpoint (uninitialised tensors of the
right shape; ``load_state_dict`` fills them). Shared by ``sparsify.hf`` and ``sparsify.hf.attention``."""

from __future__ import annotations

import torch
from torch import nn


def empty_parameter(old: torch.Tensor, shape: tuple[int, ...]) -> nn.Parameter:
    """An uninitialised parameter of ``shape`` with ``old``'s dtype, device and requires_grad."""
    return nn.Parameter(torch.empty(shape, dtype=old.dtype, device=old.device), requires_grad=old.requires_grad)


def _resize_parameters(m: nn.Module, shape: tuple[int, int], out_dim: int) -> None:
    """Give ``m.weight`` the ``shape`` and ``m.bias`` (if any) the size of its ``out_dim``; a no-op where they fit."""
    if tuple(m.weight.shape) != shape:
        m.weight = empty_parameter(m.weight, shape)
    if m.bias is not None and m.bias.shape[0] != shape[out_dim]:
        m.bias = empty_parameter(m.bias, (shape[out_dim],))


def resize_linear(m: nn.Linear, out: int | None = None, inp: int | None = None) -> None:
    """Give ``m`` the shape (out, inp) (None keeps that side)."""
    shape = (out or m.weight.shape[0], inp or m.weight.shape[1])
    _resize_parameters(m, shape, out_dim=0)
    m.out_features, m.in_features = shape


def resize_conv1d(m: nn.Module, out: int | None = None, inp: int | None = None) -> None:
    """The same for transformers' ``Conv1D`` (GPT-2), whose weight is (in, out)."""
    shape = (inp or m.weight.shape[0], out or m.weight.shape[1])
    _resize_parameters(m, shape, out_dim=1)
    m.nx, m.nf = shape
