"""The Sparsifier under ``torch.nn.parallel.DistributedDataParallel``.

Create the Sparsifier on the plain model on every rank (same seed, same example inputs), then
wrap the model in DDP, then create the optimizer::

    sp = Sparsifier(model, example_inputs, adapter="bn_gamma", policy="str")
    ddp = DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    for x, y in loader:                      # each rank its shard of the global batch
        loss_fn(ddp(x), y).backward(); opt.step(); opt.zero_grad(); sp.step()
    check_synchronized(sp)                   # thresholds and masks equal on every rank
    result, ddp, opt = prune_and_rewrap(sp, opt, lambda m: DistributedDataParallel(m))

Why this stays in sync: STR thresholds are parameters of the model (``parametrize``), so DDP
averages their gradients like any weight; GMP masks are computed from weights that DDP keeps
equal on every rank (and are broadcast from rank 0 as buffers anyway). BatchNorm running
statistics are *not* averaged unless the model uses ``nn.SyncBatchNorm``: in training mode each
rank normalises with its own batch, which DDP does not correct; importance vectors of ``bn_gamma``
are the (synced) γ parameters, so masks and thresholds stay identical, but the running statistics
(and hence eval-mode outputs) differ per rank. Convert with
``nn.SyncBatchNorm.convert_sync_batchnorm(model)`` before creating the Sparsifier if that matters.

``prune()`` changes parameter shapes: it must run on every rank (it is deterministic, so every
rank removes the same structures), and the old DDP wrapper is then stale (its reducer holds the
old parameters): wrap the pruned model in a new DDP. ``prune(optimizer=opt)`` slices the
optimizer's state and points it at the new parameters, so the same optimizer keeps its momentum.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from sparsify.errors import SparsifyError


def sparsity_state(sp: Any) -> dict[str, torch.Tensor]:
    """Every transform tensor of the Sparsifier (STR thresholds ``s``, GMP masks), by vector name."""
    out: dict[str, torch.Tensor] = {}
    for i, v in enumerate(sp.vectors):
        if v.transform is None:
            continue
        for name, t in [*v.transform.named_parameters(), *v.transform.named_buffers()]:
            out[f"{i}:{v.name}:{name}"] = t.detach()
    return out


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def check_synchronized(sp: Any, process_group: Any = None, *, include_weights: bool = False) -> dict[str, Any]:
    """Raise ``SparsifyError`` unless thresholds and masks (and, with ``include_weights``, every
    model parameter) are bit-identical on all ranks of ``process_group``.

    All-gathers one hash per tensor (``all_gather_object``: works on gloo and NCCL; with NCCL set
    the CUDA device first). Returns ``{"world_size", "rank", "tensors", "digest"}``; without an
    initialised process group it checks nothing and reports world_size 1.
    """
    state = sparsity_state(sp)
    if include_weights:
        state |= {f"param:{k}": p for k, p in sp.model.named_parameters()}
    digests = {k: _digest(t) for k, t in state.items()}
    overall = hashlib.sha256("".join(f"{k}={d};" for k, d in sorted(digests.items())).encode()).hexdigest()[:16]
    if not (dist.is_available() and dist.is_initialized()):
        return {"world_size": 1, "rank": 0, "tensors": len(digests), "digest": overall}
    world = dist.get_world_size(process_group)
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, digests, group=process_group)
    differ = sorted({k for other in gathered for k in set(other) | set(digests) if other.get(k) != digests.get(k)})
    if differ:
        raise SparsifyError(
            f"sparsity state differs across the {world} ranks in {len(differ)} tensors, e.g. {differ[:4]}. "
            "Create the Sparsifier on every rank with the same model weights and config before wrapping the "
            "model in DDP, call sp.step() on every rank after each optimizer step, and use SyncBatchNorm if "
            "importance depends on BatchNorm statistics.")
    return {"world_size": world, "rank": dist.get_rank(process_group), "tensors": len(digests), "digest": overall}


def prune_and_rewrap(sp: Any, optimizer: torch.optim.Optimizer | None,
                     wrap: Callable[[nn.Module], nn.Module], process_group: Any = None, *, check: bool = True
                     ) -> tuple[Any, nn.Module, torch.optim.Optimizer | None]:
    """Check the ranks agree, prune on this rank (call it on every rank), and wrap the pruned model
    again (``wrap``: e.g. ``lambda m: DistributedDataParallel(m, device_ids=[rank])``).

    Returns ``(prune result, new wrapper, optimizer)``: the optimizer is the same object, its
    parameters and state swapped for the pruned ones by ``prune(optimizer=...)``.
    """
    if check:
        check_synchronized(sp, process_group)
    result = sp.prune(optimizer=optimizer)
    if dist.is_available() and dist.is_initialized():
        dist.barrier(group=process_group)
    return result, wrap(sp.model), optimizer
