"""sparsify's pruning methods for the LM benchmark, each to a parameter target.

Width (``activation`` = Wanda, ``filter_norm`` = magnitude, ``taylor`` = LLM-Pruner, ``fluctuation``
= FLAP with bias compensation): trace the channel graph once, search the ``make_plan`` sparsity
(``unit="params"``, uniform over every exact group: MLP neurons and KV groups) whose first-order
count meets the target (MLP neurons only where removing a whole KV group overshoots), then
``apply_plan`` with the importance. Depth: block influence per attention / MLP sub-block (a layer
losing both goes whole), the counts meeting the target at the least summed influence.
Experts (MoE models): router mass, removing the same
number of experts from every layer. Every function prunes ``model`` in place and returns seconds per
phase and notes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from benchmarks.llm_lib.budget import TOLERANCE, count_params, search_ratio, within

WIDTH = {"activation": "activation", "magnitude": "filter_norm", "taylor": "taylor", "fluctuation": "fluctuation"}


@dataclass
class Calibration:
    """Calibration windows of the training split (dicts of ``input_ids``; ``labeled`` adds ``labels``)."""

    batches: list[dict[str, torch.Tensor]]
    example: dict[str, torch.Tensor]
    labeled: list[dict[str, torch.Tensor]] = field(default_factory=list)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def width(model: nn.Module, calibration: Calibration, target: int, importance: str,
          round_to: int | None = None) -> dict[str, Any]:
    """Prune MLP neurons and KV groups of ``model`` to ``target`` parameters, ranked by ``importance``;
    ``round_to`` keeps every layer's width at a multiple of it (``make_plan(round_to=...)``)."""
    from sparsify import build_channel_graph
    from sparsify.oneshot import apply_plan, make_plan

    kind = WIDTH[importance]
    if kind in ("taylor", "fluctuation"):
        from sparsify.adapters.base import ADAPTERS
        if kind not in ADAPTERS:
            raise RuntimeError(f"the {kind!r} adapter is not registered in this sparsify")
    device = _device(model)
    model.config.use_cache = False  # a cache in the output makes the heads' channels a model output (a barrier)
    _sync(device)
    start = time.perf_counter()
    cg = build_channel_graph(model, calibration.example)
    graph_s = time.perf_counter() - start
    total = count_params(model)["total"]

    plans = []
    passes: list[set[str] | None] = [None]  # heads and MLP neurons; MLP neurons only where a KV group is too coarse
    if any(g.kind == "channel" and g.exact for g in cg.prunable_groups()):  # none in MoE models (experts: barriers)
        passes.append({"channel"})
    for kinds in passes:
        def params_at(sparsity: float, kinds: set[str] | None = kinds) -> float:
            plan = make_plan(model, None, sparsity, unit="params", graph=cg, kinds=kinds, round_to=round_to)
            return total - plan.params["removed"]

        sparsity = search_ratio(params_at, target, high=0.99)
        plans.append(make_plan(model, None, sparsity, unit="params", graph=cg, kinds=kinds, round_to=round_to))
        if within(total - plans[-1].params["removed"], target):
            break
    plan = min(plans, key=lambda p: abs(total - p.params["removed"] - target))
    sparsity = plan.sparsity
    plan_s = time.perf_counter() - start - graph_s
    batches = calibration.labeled if kind == "taylor" else calibration.batches
    compensate = "add_bias" if kind == "fluctuation" else False
    apply_plan(model, calibration.example, plan, importance=kind, calibration=batches, graph=cg,
               compensate=compensate)
    _sync(device)
    seconds = time.perf_counter() - start
    kinds = sorted({g.kind for g in plan.groups})
    return {"prune_s": seconds, "graph_s": graph_s, "plan_s": plan_s, "apply_s": seconds - graph_s - plan_s,
            "sparsity_in_groups": sparsity, "kinds": kinds,
            "round_to": round_to, "kept": sorted({(g.kind, g.keep) for g in plan.groups}),
            "note": f"sparsify {kind} importance; make_plan uniform over {len(plan.groups)} exact groups {kinds}"
                    + (f", widths at multiples of {round_to}" if round_to and round_to > 1 else "")
                    + ("; FLAP bias compensation (add_bias)" if compensate else "")}


def _params(*modules: nn.Module) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


def depth_counts(n: int, attention: int, mlp: int, need: int, tolerance: float,
                 cost: Any = None) -> tuple[int, int]:
    """How many attention and MLP sub-blocks to remove: ``(b, a)`` with ``b · attention + a · mlp`` within
    ``tolerance`` of ``need``, at the least ``cost(b, a)`` (default: the fewest sub-blocks); if none is
    within, the closest. A layer losing both is a whole layer; at least one layer stays.
    """
    cost = cost or (lambda b, a: b + a)
    options = [(b, a) for b in range(n + 1) for a in range(n + 1) if min(a, b) < n]
    feasible = [o for o in options if abs(o[0] * attention + o[1] * mlp - need) <= tolerance]
    if feasible:
        return min(feasible, key=lambda o: (cost(*o), o))
    return min(options, key=lambda o: abs(o[0] * attention + o[1] * mlp - need))


def depth(model: nn.Module, calibration: Calibration, target: int) -> dict[str, Any]:
    """Remove decoder sub-blocks (attention, MLP; both of a layer = the whole layer) to reach ``target``.

    Whole layers alone meet a target only to a layer (~10 % of this model), so depth works on
    sub-blocks (ShortGPT's block influence per sub-block, Men et al. 2024; "what matters in
    transformers": attention removal): each sub-block is ranked by its influence on the dense model,
    the counts (attention, MLP) are those within 1 % of the target at the least summed influence, and
    the least influential of each kind go; a layer losing both is removed whole (``remove_layers``).
    """
    from sparsify import hf

    device = _device(model)
    _sync(device)
    start = time.perf_counter()
    layers = list(model.model.layers)
    n = len(layers)
    attention = _params(layers[0].self_attn, layers[0].input_layernorm)
    mlp = _params(layers[0].mlp, layers[0].post_attention_layernorm)
    scores = {kind: hf.layer_importance(model, calibration.batches, method=f"{kind}_block_influence")
              for kind in ("attn", "mlp")}
    ranked = {kind: s.argsort().tolist() for kind, s in scores.items()}

    def cost(b: int, a: int) -> float:
        return float(scores["attn"][ranked["attn"][:b]].sum() + scores["mlp"][ranked["mlp"][:a]].sum())

    total = count_params(model)["total"]
    b, a = depth_counts(n, attention, mlp, total - target, TOLERANCE * target, cost)
    drop_attention, drop_mlp = set(ranked["attn"][:b]), set(ranked["mlp"][:a])
    whole = sorted(drop_attention & drop_mlp)
    only_attention, only_mlp = sorted(drop_attention - set(whole)), sorted(drop_mlp - set(whole))
    if only_attention or only_mlp:
        hf.remove_sublayers(model, attention=only_attention, mlp=only_mlp)
    if whole:
        hf.remove_layers(model, whole)
    _sync(device)
    return {"prune_s": time.perf_counter() - start, "removed_layers": whole,
            "removed_attention": only_attention, "removed_mlp": only_mlp,
            "note": f"sub-block influence (ShortGPT per sub-block): {len(whole)} of {n} whole layers, attention of "
                    f"{only_attention}, MLP of {only_mlp} removed (layer indices of the dense model; "
                    f"{attention:,} / {mlp:,} params per attention / MLP)"}


def experts(model: nn.Module, calibration: Calibration, target: int) -> dict[str, Any]:
    """Remove the same number of least router-mass experts from every MoE layer to reach ``target``."""
    from sparsify.hf import experts as moe

    layers = moe.moe_layers(model)
    if not layers:
        raise RuntimeError("the model has no MoE layer (experts need a Mixtral-style model)")
    device = _device(model)
    _sync(device)
    start = time.perf_counter()
    importance = moe.expert_importance(model, calibration.batches, method="router_mass")
    per_expert = sum(p.numel() for p in layers[0].experts.parameters()) // layers[0].num_experts
    need = count_params(model)["total"] - target
    each = min(round(need / (per_expert * len(layers))), min(m.num_experts - m.top_k for m in layers))
    fraction = each / layers[0].num_experts
    report = moe.prune_experts(model, importance, fraction=fraction, budget="uniform")
    _sync(device)
    return {"prune_s": time.perf_counter() - start, "experts_removed_per_layer": each,
            "note": f"router mass; {each} of {layers[0].num_experts} experts removed per layer "
                    f"(fraction {fraction:.3f}, counts {getattr(report, 'counts', None)})"}
