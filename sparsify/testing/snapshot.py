"""Bit-for-bit snapshots of a model (and optimizer) for "a refused call changed nothing" tests.

>>> before = snapshot(model, optimizer)
>>> with pytest.raises(PruneError): prune_channels(cg, bad_plan, optimizer=optimizer)
>>> assert_unchanged(before, model, optimizer)

A snapshot holds copies of every parameter and buffer (with the identity of the tensor object, its
dtype, device and requires_grad), each module's class, plain attributes, parametrizations, hooks and
submodule names, the state_dict keys, and the optimizer's param groups and state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

_TABLES = ("_parameters", "_buffers", "_modules")


def _tensor_key(t: torch.Tensor) -> tuple[Any, ...]:
    return (id(t), t.dtype, str(t.device), tuple(t.shape), t.requires_grad)


def _copy(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone() if not t.is_meta else t.detach()


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
        return False
    if a.is_meta:
        return True
    if a.is_quantized:
        return torch.equal(a.int_repr(), b.int_repr()) and a.q_scale() == b.q_scale()
    return bool(torch.equal(a, b)) or bool(((a != a) & (b != b)).logical_or(a == b).all())  # NaN == NaN here


def _attributes(module: nn.Module) -> dict[str, Any]:
    out = {}
    for k, v in vars(module).items():
        if k in _TABLES:
            continue
        if isinstance(v, dict):  # hook tables and the like: their keys and callables
            out[k] = tuple((key, id(val)) for key, val in v.items())
        elif isinstance(v, torch.Tensor):
            out[k] = ("tensor", _tensor_key(v))
        else:
            out[k] = ("repr", type(v).__name__, repr(v)[:200]) if not isinstance(v, (int, float, str, bool, tuple,
                                                                                   type(None))) else v
    return out


def _parametrizations(module: nn.Module) -> dict[str, tuple[int, ...]]:
    if not parametrize.is_parametrized(module):
        return {}
    return {name: tuple(id(p) for p in plist) for name, plist in module.parametrizations.items()}


@dataclass
class ModelSnapshot:
    """What :func:`snapshot` recorded (compare with :func:`assert_unchanged`)."""

    tensors: dict[str, tuple[tuple[Any, ...], torch.Tensor]]
    modules: dict[str, tuple[type, dict[str, Any], dict[str, tuple[int, ...]], tuple[str, ...]]]
    state_dict_keys: tuple[str, ...]
    training: dict[str, bool]
    optimizer: dict[str, Any] | None


def _tensors(model: nn.Module) -> dict[str, tuple[tuple[Any, ...], torch.Tensor]]:
    out = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for table in ("_parameters", "_buffers"):
            for attr, t in getattr(module, table).items():
                key = f"{name}.{attr}" if name else attr
                out[f"{table[1:-1]}:{key}"] = (None, None) if t is None else (_tensor_key(t), _copy(t))
                if t is not None and t.grad is not None:
                    out[f"grad:{key}"] = (_tensor_key(t.grad), _copy(t.grad))
    return out


def _optimizer(optimizer: torch.optim.Optimizer | None) -> dict[str, Any] | None:
    if optimizer is None:
        return None
    groups = [{k: (tuple(id(p) for p in v) if k == "params" else repr(v)) for k, v in g.items()}
              for g in optimizer.param_groups]
    state = {}
    for p, s in optimizer.state.items():
        for k, v in s.items():
            state[(id(p), k)] = (_tensor_key(v), _copy(v)) if isinstance(v, torch.Tensor) else (None, repr(v))
    return {"groups": groups, "state": state}


def snapshot(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> ModelSnapshot:
    """Record ``model`` (and ``optimizer``) bit for bit."""
    modules = {name: (type(m), _attributes(m), _parametrizations(m), tuple(m._modules))
               for name, m in model.named_modules(remove_duplicate=False)}
    return ModelSnapshot(_tensors(model), modules, tuple(model.state_dict().keys()),
                         {name: m.training for name, m in model.named_modules()}, _optimizer(optimizer))


def differences(before: ModelSnapshot, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> list[str]:
    """What differs between ``before`` and the model (and optimizer) now; empty if nothing."""
    now = snapshot(model, optimizer)
    out = []
    for name in sorted(set(before.tensors) | set(now.tensors)):
        if name not in now.tensors or name not in before.tensors:
            out.append(f"{name} {'removed' if name not in now.tensors else 'added'}")
            continue
        (k0, t0), (k1, t1) = before.tensors[name], now.tensors[name]
        if k0 != k1:
            out.append(f"{name}: object/dtype/device/shape/requires_grad {k0[1:]} → {k1[1:] if k1 else None}")
        elif t0 is not None and not _same(t0, t1):
            out.append(f"{name}: values changed")
    for name in sorted(set(before.modules) | set(now.modules)):
        if name not in now.modules or name not in before.modules:
            out.append(f"module {name!r} {'removed' if name not in now.modules else 'added'}")
            continue
        for what, a, b in zip(("class", "attributes", "parametrizations", "submodules"),
                              before.modules[name], now.modules[name], strict=True):
            if a != b:
                detail = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))[:5] if isinstance(a, dict) else ""
                out.append(f"module {name!r}: {what} changed {detail}")
    if before.state_dict_keys != now.state_dict_keys:
        out.append(f"state_dict keys changed: +{sorted(set(now.state_dict_keys) - set(before.state_dict_keys))} "
                   f"-{sorted(set(before.state_dict_keys) - set(now.state_dict_keys))}")
    if before.training != now.training:
        out.append("train/eval modes changed")
    if (before.optimizer is None) != (now.optimizer is None):
        out.append("optimizer given to only one of snapshot() and assert_unchanged()")
    elif before.optimizer is not None:
        if before.optimizer["groups"] != now.optimizer["groups"]:
            out.append("optimizer param_groups changed")
        s0, s1 = before.optimizer["state"], now.optimizer["state"]
        if set(s0) != set(s1):
            out.append("optimizer state entries changed")
        else:
            for key, (k0, v0) in s0.items():
                k1, v1 = s1[key]
                if k0 != k1 or (k0 is None and v0 != v1) or (k0 is not None and not _same(v0, v1)):
                    out.append(f"optimizer state {key[1]!r} changed")
    return out


def assert_unchanged(before: ModelSnapshot, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Raise AssertionError listing every difference between ``before`` and the model (and optimizer) now."""
    diff = differences(before, model, optimizer)
    if diff:
        raise AssertionError("the model changed: " + "; ".join(diff[:12]) + (" …" if len(diff) > 12 else ""))
