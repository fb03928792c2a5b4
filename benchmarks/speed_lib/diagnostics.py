"""``--profile``: why a network is (not) as much faster as its MACs or the latency model say.

Two views of the same deployed network, written to the JSON:

* **device time by kernel kind** (``sparsify.measure.time_by_kind``): conv, element-wise, copies, ...;
* **layers alone vs in the network**: the latency model's ms of every conv/linear layer timed alone (as the
  budget saw it) against the time the same layer takes inside the eager deployed network (CUDA events around
  the module; on the CPU perf_counter), and the network's measured total. ``outside_layers_ms`` (network −
  layers in the network) is time pruning does not touch; ``alone_over_network`` shows whether the tables
  mis-time layers; a pruned network's ``saving`` compares the estimated, in-network and measured savings.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from sparsify.measure.breakdown import time_by_kind


def kinds(run: Callable[[], None], device: torch.device) -> dict[str, Any]:
    by_kind, top = time_by_kind(run, device=device, iters=5, warmup=1)
    return {"device_ms_by_kind": {k: round(v, 3) for k, v in by_kind.items()},
            "top_kernels": [{**t, "ms": round(t["ms"], 3)} for t in top]}


def layer_times_in_network(module: nn.Module, run: Callable[[], None], names: list[str], device: torch.device,
                           calls: int = 3) -> dict[str, float]:
    """ms per call of each module ``names`` (weight keys or module paths) inside ``run`` (an eager forward of
    ``module``): events before and after the module, averaged over ``calls`` calls after one warm-up."""
    cuda = device.type == "cuda"
    paths = {n.removesuffix(".weight"): n for n in names}
    found = {p: module.get_submodule(p) for p in paths if _has(module, p)}
    marks: dict[str, list[Any]] = {p: [] for p in found}
    handles = []
    for path, sub in found.items():
        def pre(_m: nn.Module, _a: Any, path: str = path) -> None:
            marks[path].append([_mark(cuda), None])

        def post(_m: nn.Module, _a: Any, _o: Any, path: str = path) -> None:
            marks[path][-1][1] = _mark(cuda)

        handles += [sub.register_forward_pre_hook(pre), sub.register_forward_hook(post)]
    try:
        run()
        for m in marks.values():
            m.clear()
        for _ in range(calls):
            run()
        if cuda:
            torch.cuda.synchronize(device)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for path, pairs in marks.items():
        spans = [(a.elapsed_time(b) if cuda else (b - a) * 1e3) for a, b in pairs if b is not None]
        if spans:
            out[paths[path]] = sum(spans) / calls
    return out


def _has(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
        return True
    except AttributeError:
        return False


def _mark(cuda: bool) -> Any:
    if not cuda:
        return time.perf_counter()
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


def alone_vs_network(alone: dict[str, float], in_network: dict[str, float], network_ms: float) -> dict[str, Any]:
    """Sums and the layers whose alone time differs most from their time in the network."""
    common = [n for n in alone if n in in_network]
    alone_sum, net_sum = sum(alone[n] for n in common), sum(in_network[n] for n in common)
    worst = sorted(common, key=lambda n: -abs(alone[n] - in_network[n]))[:10]
    return {"layers": len(common), "layers_not_found": len(alone) - len(common),
            "alone_sum_ms": round(alone_sum, 4), "in_network_sum_ms": round(net_sum, 4),
            "network_ms": round(network_ms, 4), "outside_layers_ms": round(network_ms - net_sum, 4),
            "alone_over_network": round(alone_sum / net_sum, 3) if net_sum > 0 else None,
            "largest_differences": [{"layer": n, "alone_ms": round(alone[n], 4),
                                     "in_network_ms": round(in_network[n], 4)} for n in worst]}


def saving(dense: dict[str, Any], pruned: dict[str, Any]) -> dict[str, Any]:
    """ms saved by pruning as the tables estimate it, inside the network, and measured on the whole network."""
    return {"estimated_ms": round(dense["alone_sum_ms"] - pruned["alone_sum_ms"], 4),
            "in_network_layers_ms": round(dense["in_network_sum_ms"] - pruned["in_network_sum_ms"], 4),
            "measured_network_ms": round(dense["network_ms"] - pruned["network_ms"], 4)}
