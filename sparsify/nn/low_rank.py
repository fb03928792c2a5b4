"""Low-rank layers W = U·diag(σ)·V and the truncated SVD that makes them from dense layers.

The modules are written with ``F.linear`` / ``F.conv2d`` on their parameters, so fx traces through them
and the channel graph sees the rank dimension as one channel group (V rows, σ, U columns); the
``low_rank`` adapter (:mod:`sparsify.adapters.low_rank`) takes σ as that group's importance.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sparsify._utils import set_submodule
from sparsify.graph.module_types import register_module_type

__all__ = ["LowRankConv2d", "LowRankLinear", "factorize_", "factorize_conv2d", "factorize_linear"]


def _reset_factors(m: LowRankLinear | LowRankConv2d, fan_in: int) -> None:
    """nn.Linear-style initialisation of both factors, σ = 1, bias uniform in ±1/√fan_in."""
    nn.init.kaiming_uniform_(m.V, a=math.sqrt(5))
    nn.init.kaiming_uniform_(m.U, a=math.sqrt(5))
    nn.init.ones_(m.sigma)
    if m.bias is not None:
        bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0.0
        nn.init.uniform_(m.bias, -bound, bound)


def _check_rank(rank: int) -> None:
    if rank < 1:
        raise ValueError(f"rank must be ≥ 1, got {rank}")


class LowRankLinear(nn.Module):
    """y = ((x @ Vᵀ) * σ) @ Uᵀ + b with U (out×r), σ (r), V (r×in): a rank-r linear layer."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        _check_rank(rank)
        kw: dict[str, Any] = {"device": device, "dtype": dtype}
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.U = nn.Parameter(torch.empty(out_features, rank, **kw))
        self.sigma = nn.Parameter(torch.empty(rank, **kw))
        self.V = nn.Parameter(torch.empty(rank, in_features, **kw))
        self.bias = nn.Parameter(torch.empty(out_features, **kw)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear-style initialisation of both factors, σ = 1."""
        _reset_factors(self, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.V) * self.sigma, self.U, self.bias)

    def dense_weight(self) -> torch.Tensor:
        """The equivalent dense weight U·diag(σ)·V (out×in)."""
        return (self.U * self.sigma) @ self.V

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"bias={self.bias is not None}")


class LowRankConv2d(nn.Module):
    """A k×k convolution to r channels (V), a per-channel scale σ, and a 1×1 convolution to out (U)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int], rank: int,
                 stride: int | tuple[int, int] = 1, padding: int | tuple[int, int] = 0,
                 dilation: int | tuple[int, int] = 1, bias: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        _check_rank(rank)
        kw: dict[str, Any] = {"device": device, "dtype": dtype}
        k = nn.modules.utils._pair(kernel_size)
        self.in_channels, self.out_channels, self.rank = in_channels, out_channels, rank
        self.kernel_size, self.stride = k, nn.modules.utils._pair(stride)
        self.padding, self.dilation = nn.modules.utils._pair(padding), nn.modules.utils._pair(dilation)
        self.V = nn.Parameter(torch.empty(rank, in_channels, *k, **kw))
        self.sigma = nn.Parameter(torch.empty(rank, **kw))
        self.U = nn.Parameter(torch.empty(out_channels, rank, 1, 1, **kw))
        self.bias = nn.Parameter(torch.empty(out_channels, **kw)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Conv2d-style initialisation of both factors, σ = 1."""
        _reset_factors(self, self.in_channels * self.kernel_size[0] * self.kernel_size[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.conv2d(x, self.V, None, self.stride, self.padding, self.dilation)
        return F.conv2d(h * self.sigma.view(-1, 1, 1), self.U, self.bias)

    def dense_weight(self) -> torch.Tensor:
        """The equivalent dense k×k kernel (out×in×k×k)."""
        return torch.einsum("or,r,rikl->oikl", self.U[:, :, 0, 0], self.sigma, self.V)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, rank={self.rank}, "
                f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
                f"bias={self.bias is not None}")


def _sync_linear(m: LowRankLinear, old: dict[str, Any]) -> None:
    m.out_features, m.rank = m.U.shape
    m.in_features = m.V.shape[1]


def _sync_conv(m: LowRankConv2d, old: dict[str, Any]) -> None:
    m.out_channels, m.rank = m.U.shape[:2]
    m.in_channels = m.V.shape[1]


register_module_type(LowRankLinear, sync=_sync_linear)
register_module_type(LowRankConv2d, sync=_sync_conv)


# ----- factorisation ------------------------------------------------------------------------------
def _choose_rank(s: torch.Tensor, rank: int | None, energy: float | None) -> int:
    full = s.numel()
    if (rank is None) == (energy is None):
        raise ValueError("pass exactly one of rank= or energy=")
    if rank is not None:
        if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)):
            raise ValueError(f"rank must be an int, got {rank!r}")
        if not 1 <= rank <= full:
            raise ValueError(f"rank must be in [1, min(in, out)] = [1, {full}], got {rank}")
        return int(rank)
    if not 0.0 < float(energy) <= 1.0:
        raise ValueError(f"energy must be in (0, 1] (the fraction of Σσ² to keep), got {energy}")
    sq = s.double().square()
    total = float(sq.sum())
    if total == 0.0:
        return 1
    kept = (sq.cumsum(0) / total).cpu().numpy()
    return min(int((kept < float(energy) - 1e-12).sum()) + 1, full)


def _truncated_svd(w: torch.Tensor, rank: int | None, energy: float | None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U (out×r), σ (r), V (r×in) of a 2-D weight; computed in float64, returned in w's dtype."""
    u, s, vh = torch.linalg.svd(w.detach().double(), full_matrices=False)
    r = _choose_rank(s, rank, energy)
    return u[:, :r].to(w.dtype), s[:r].to(w.dtype), vh[:r].to(w.dtype)


def _copy_into(param: nn.Parameter, value: torch.Tensor, like: torch.Tensor) -> None:
    with torch.no_grad():
        param.copy_(value.reshape(param.shape))
    param.requires_grad_(like.requires_grad)


def _load(out: LowRankLinear | LowRankConv2d, dense: nn.Linear | nn.Conv2d,
          factors: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
    """Copy U, σ, V and ``dense``'s bias into ``out``; it takes ``dense``'s requires_grad and mode."""
    for param, value in zip((out.U, out.sigma, out.V), factors, strict=True):
        _copy_into(param, value, dense.weight)
    if dense.bias is not None:
        _copy_into(out.bias, dense.bias.detach(), dense.bias)
    out.train(dense.training)


def factorize_linear(linear: nn.Linear, rank: int | None = None, energy: float | None = None) -> LowRankLinear:
    """Truncated SVD of ``linear`` as a :class:`LowRankLinear` (exact at rank = min(in, out)).

    Give ``rank``, or ``energy``: the smallest rank whose singular values keep that fraction of Σσ²
    (the squared Frobenius norm of the weight).
    """
    if not isinstance(linear, nn.Linear):
        raise ValueError(f"factorize_linear expects an nn.Linear, got {type(linear).__name__}")
    w = linear.weight
    factors = _truncated_svd(w, rank, energy)
    out = LowRankLinear(linear.in_features, linear.out_features, factors[1].numel(), bias=linear.bias is not None,
                        device=w.device, dtype=w.dtype)
    _load(out, linear, factors)
    return out


def factorize_conv2d(conv: nn.Conv2d, rank: int | None = None, energy: float | None = None) -> LowRankConv2d:
    """Truncated SVD of a (non-grouped, zero-padded) ``nn.Conv2d`` kernel reshaped to out×(in·k·k)."""
    if not isinstance(conv, nn.Conv2d):
        raise ValueError(f"factorize_conv2d expects an nn.Conv2d, got {type(conv).__name__}")
    if conv.groups != 1 or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        raise ValueError("factorize_conv2d supports groups=1, padding_mode='zeros' and numeric padding only")
    w = conv.weight
    factors = _truncated_svd(w.flatten(1), rank, energy)
    out = LowRankConv2d(conv.in_channels, conv.out_channels, conv.kernel_size, factors[1].numel(), conv.stride,
                        conv.padding, conv.dilation, bias=conv.bias is not None, device=w.device, dtype=w.dtype)
    _load(out, conv, factors)
    return out


def factorize_(model: nn.Module, names_or_predicate: str | Iterable[str] | Callable[[str, nn.Module], bool],
               rank: int | None = None, energy: float | None = None) -> dict[str, int]:
    """Replace chosen ``nn.Linear`` submodules of ``model`` by :class:`LowRankLinear`, in place.

    ``names_or_predicate``: qualified module names, or ``fn(name, module) -> bool`` asked for every
    ``nn.Linear``. Returns {name: chosen rank}. All layers are factorised before any is replaced, so a
    bad argument leaves the model unchanged.
    """
    if callable(names_or_predicate):
        names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and names_or_predicate(n, m)]
    else:
        names = [names_or_predicate] if isinstance(names_or_predicate, str) else list(names_or_predicate)
    replacements: dict[str, LowRankLinear] = {}
    for name in names:
        if name == "":
            raise ValueError("cannot replace the model itself in place; call factorize_linear(model) instead")
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"model has no submodule {name!r}") from None
        if not isinstance(module, nn.Linear):
            raise ValueError(f"submodule {name!r} is a {type(module).__name__}, not an nn.Linear")
        try:
            replacements[name] = factorize_linear(module, rank=rank, energy=energy)
        except ValueError as exc:
            raise ValueError(f"{name!r}: {exc}") from None
    for name, new in replacements.items():
        set_submodule(model, name, new)
    return {name: new.rank for name, new in replacements.items()}
