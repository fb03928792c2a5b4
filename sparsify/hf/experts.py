"""Mixture-of-experts layers (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE): experts as structures.

Each sparse-MoE block holds a router (``gate``: one weight row per expert) and the experts fused in 3-D
tensors (``gate_up_proj`` [E, 2I, H], ``down_proj`` [E, H, I], transformers 5). ``expert_importance``
scores every expert from calibration data (sums only, through forward hooks); ``remove_experts`` slices
the router rows and the experts' tensors physically (shared experts untouched) and updates the module
attributes and the config; ``prune_experts`` removes a fraction of them by their scores.

Exactness: an expert the router never puts in a token's top-k contributes nothing, so removing it is exact
when the router renormalises the top-k weights (Mixtral always; Qwen/OLMoE with ``norm_topk_prob=True``).
A router that does not renormalise (Qwen2/Qwen3-MoE, OLMoE default) weights each chosen expert by its
softmax probability over *all* experts; removing an expert drops its exp(logit) from the denominator, so
the kept experts' weights grow by Z_all/Z_kept for every token. The router has no bias that could hold
the removed mass, so no correction is applied: ``ExpertRemoval.renormalised`` says which layers are exact
for never-selected experts, and the removed experts' ``router_mass`` measures what the others gain.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from sparsify.errors import PruneError, SparsifyError
from sparsify.hf.inputs import check_model, token_batches

#: config attribute of the per-layer expert counts, where layers differ (``from_pretrained`` rebuilds them)
EXPERTS_RECORD = "sparsify_num_experts"

#: sparse-MoE block class → the config field holding the expert count (transformers 5 fused experts)
_BLOCKS = {"MixtralSparseMoeBlock": "num_local_experts", "Qwen2MoeSparseMoeBlock": "num_experts",
           "Qwen3MoeSparseMoeBlock": "num_experts", "OlmoeSparseMoeBlock": "num_experts"}
_EXPERT_TENSORS = ("gate_up_proj", "down_proj")
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass(frozen=True)
class MoeLayer:
    """One sparse-MoE block: its decoder-layer index, dotted name, router and fused experts."""

    index: int
    name: str
    block: nn.Module
    router: nn.Module
    experts: nn.Module

    @property
    def num_experts(self) -> int:
        return int(self.router.weight.shape[0])

    @property
    def top_k(self) -> int:
        return int(self.router.top_k)

    @property
    def renormalised(self) -> bool:
        """True if the router renormalises the top-k weights (removing never-selected experts is exact)."""
        return type(self.block).__name__ == "MixtralSparseMoeBlock" or bool(self.router.norm_topk_prob)


def _check_layout(name: str, block: nn.Module) -> tuple[nn.Module, nn.Module]:
    cls = type(block).__name__
    if cls not in _BLOCKS:
        raise SparsifyError(f"'{name}' is a {cls}, a mixture-of-experts layout sparsify.hf.experts does not know "
                            f"(known: {sorted(_BLOCKS)}, transformers 5 fused experts); its experts cannot be "
                            "removed. Prune the other structures, or add the layout to sparsify/hf/experts.py.")
    router, experts = getattr(block, "gate", None), getattr(block, "experts", None)
    tensors = [getattr(experts, t, None) for t in _EXPERT_TENSORS]
    weight = getattr(router, "weight", None)
    if not isinstance(weight, torch.Tensor) or any(not isinstance(t, torch.Tensor) or t.dim() != 3 for t in tensors):
        raise SparsifyError(f"'{name}' ({cls}) has no router weight or no 3-D expert tensors {_EXPERT_TENSORS} "
                            "(a transformers version with another expert layout?); its experts cannot be removed.")
    counts = {"gate.weight": weight.shape[0],
              **{f"experts.{t}": x.shape[0] for t, x in zip(_EXPERT_TENSORS, tensors, strict=True)},
              "experts.num_experts": experts.num_experts, "gate.num_experts": router.num_experts}
    if len(set(counts.values())) != 1:
        raise SparsifyError(f"'{name}' ({cls}): expert counts disagree ({counts}); the block is inconsistent.")
    return router, experts


def moe_layers(model: nn.Module) -> list[MoeLayer]:
    """Every sparse-MoE block of ``model``, in order; raises ``SparsifyError`` naming an unknown MoE layout
    (a module with an ``experts`` child that is not a known block) or if the model has no MoE layer."""
    found = []
    for name, module in model.named_modules():
        if not isinstance(getattr(module, "experts", None), nn.Module):
            continue
        router, experts = _check_layout(name, module)
        match = _LAYER.search(f".{name}.")
        if match is None:
            raise SparsifyError(f"the MoE block '{name}' is not inside a 'layers.<i>' list; cannot index it.")
        found.append(MoeLayer(int(match.group(1)), name, module, router, experts))
    if not found:
        raise SparsifyError(f"{type(model).__name__} has no mixture-of-experts layer (known blocks: {sorted(_BLOCKS)})")
    return found


# ----- importance ------------------------------------------------------------------------------
Method = Literal["router_mass", "frequency", "output_norm"]


def _expert_output_norms(experts: nn.Module, hidden: torch.Tensor, index: torch.Tensor,
                         weights: torch.Tensor) -> torch.Tensor:
    """Σ over routed tokens of ‖routing weight · expert(x)‖₂, per expert (recomputed, nothing kept)."""
    sums = torch.zeros(experts.gate_up_proj.shape[0], dtype=torch.float64, device=hidden.device)
    for e in range(sums.shape[0]):
        token, slot = torch.where(index == e)
        gate, up = nn.functional.linear(hidden[token], experts.gate_up_proj[e]).chunk(2, dim=-1)
        out = nn.functional.linear(experts.act_fn(gate) * up, experts.down_proj[e])
        out = out * weights[token, slot, None].to(out.dtype)
        sums[e] = out.double().norm(dim=-1).sum()
    return sums


def expert_importance(model: nn.Module, batches: Iterable[Any],
                      method: Method = "router_mass") -> dict[int, torch.Tensor]:
    """Per MoE layer (decoder-layer index), a float64 vector over its experts, summed over the tokens of
    ``batches`` (dicts of model inputs, or input-id tensors), under ``torch.no_grad``:

    - ``router_mass``: Σ softmax probability the router gives each expert (over all experts);
    - ``frequency``: how many times each expert is in a token's top-k;
    - ``output_norm``: Σ ‖routing weight · expert output‖₂ over the tokens routed to it.
    """
    if method not in ("router_mass", "frequency", "output_norm"):
        raise SparsifyError(f"unknown method {method!r}; use 'router_mass', 'frequency' or 'output_norm'")
    layers = moe_layers(model)
    batches = token_batches(model, batches, "expert_importance")
    sums = {m.index: torch.zeros(m.num_experts, dtype=torch.float64, device=m.router.weight.device) for m in layers}

    def router_hook(layer: MoeLayer):
        def hook(module: nn.Module, args: Any, output: tuple[torch.Tensor, ...]) -> None:
            logits, _, index = output
            if method == "router_mass":
                sums[layer.index] += torch.softmax(logits.double(), dim=-1).sum(0)
            else:
                sums[layer.index].index_add_(0, index.flatten(), torch.ones_like(index.flatten(), dtype=torch.float64))
        return hook

    def experts_hook(layer: MoeLayer):
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            sums[layer.index] += _expert_output_norms(module, *args[:3])
        return hook

    if method == "output_norm":
        handles = [m.experts.register_forward_hook(experts_hook(m)) for m in layers]
    else:
        handles = [m.router.register_forward_hook(router_hook(m)) for m in layers]
    try:
        with torch.no_grad():
            for batch in batches:
                model(**batch)
    finally:
        for h in handles:
            h.remove()
    return {i: v.cpu() for i, v in sums.items()}


# ----- removal ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class ExpertRemoval:
    """What ``remove_experts`` did, per MoE layer (decoder-layer index). Top-k never changes (a layer keeps
    at least top_k experts). ``renormalised[i]``: removing never-selected experts of layer i is exact;
    ``per_layer_record``: counts differ between layers and are stored in ``config.sparsify_num_experts``."""

    removed: dict[int, list[int]]
    kept: dict[int, list[int]]
    top_k: dict[int, int]
    renormalised: dict[int, bool]
    per_layer_record: bool

    @property
    def counts(self) -> dict[int, int]:
        return {i: len(k) for i, k in self.kept.items()}


def _param(old: torch.Tensor, value: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(value.contiguous(), requires_grad=old.requires_grad)


def _slice_layer(layer: MoeLayer, keep: torch.Tensor) -> None:
    """Keep the experts ``keep`` (ascending indices) of one block: router rows, expert tensors, attributes."""
    router, experts = layer.router, layer.experts
    with torch.no_grad():
        router.weight = _param(router.weight, router.weight[keep.to(router.weight.device)])
        if isinstance(getattr(router, "bias", None), torch.Tensor):
            router.bias = _param(router.bias, router.bias[keep.to(router.bias.device)])
        for t in _EXPERT_TENSORS:
            old = getattr(experts, t)
            setattr(experts, t, _param(old, old[keep.to(old.device)]))
    router.num_experts = experts.num_experts = len(keep)
    if hasattr(layer.block, "num_experts"):
        layer.block.num_experts = len(keep)


def _sync_config(model: nn.Module, counts: dict[int, int], field: str) -> bool:
    """Write the expert count into ``config.<field>`` (the largest, where layers differ, with every layer's
    count in ``config.sparsify_num_experts``); returns whether the per-layer record is needed."""
    config = model.config
    setattr(config, field, max(counts.values()))
    if len(set(counts.values())) > 1:
        setattr(config, EXPERTS_RECORD, {str(i): n for i, n in sorted(counts.items())})
        return True
    if hasattr(config, EXPERTS_RECORD):
        delattr(config, EXPERTS_RECORD)
    return False


def _expert_ids(layer: int, chosen: Any, count: int) -> list[int]:
    """The expert indices of one layer's request, checked: integers in 0..count-1, each named once."""
    if isinstance(chosen, (str, bytes)) or not isinstance(chosen, Iterable):
        raise PruneError(f"layer {layer}: give the experts to remove as a list of indices, got {chosen!r:.60}")
    ids = []
    for e in chosen:
        try:
            ids.append(-1 if isinstance(e, bool) else operator.index(e))
        except TypeError:
            raise PruneError(f"layer {layer}: expert indices must be integers, got {e!r}") from None
    if len(set(ids)) != len(ids):
        raise PruneError(f"layer {layer}: expert indices repeat ({ids}); name each expert once")
    if any(not 0 <= e < count for e in ids):
        raise PruneError(f"layer {layer} has experts 0..{count - 1}; cannot remove {sorted(ids)}")
    return sorted(ids)


def _check_config(model: nn.Module, layers: dict[int, MoeLayer], field: str) -> None:
    """Refuse a config whose expert count or top-k disagrees with the modules (edited by hand)."""
    config = model.config
    counts = recorded_counts(config) or dict.fromkeys(layers, getattr(config, field, None))
    wrong = {i: (counts.get(i), m.num_experts) for i, m in layers.items() if counts.get(i) != m.num_experts}
    if wrong:
        raise PruneError(f"config.{field} (or config.{EXPERTS_RECORD}) disagrees with the MoE layers' expert counts "
                         f"{{layer: (config, modules)}} = {wrong} (config edited by hand?); put the modules' counts "
                         "back into the config")
    top_k = getattr(config, "num_experts_per_tok", None)
    bad = {i: m.top_k for i, m in layers.items() if top_k is not None and m.top_k != top_k}
    if bad:
        raise PruneError(f"config.num_experts_per_tok is {top_k} but the routers choose {bad} experts per token "
                         "(config edited by hand?); set it back to the routers' top_k")


def remove_experts(model: nn.Module, experts: Mapping[int, Iterable[int]]) -> ExpertRemoval:
    """Remove ``experts`` ({decoder-layer index: expert indices}) physically: the router's rows, the
    experts' tensor slices, ``num_experts`` of the router/experts modules and the config's count (see
    ``ExpertRemoval``). All-or-nothing: a bad request raises ``PruneError`` before anything changes.
    Parameters are new tensors afterwards: build the optimizer after removing."""
    layers = {m.index: m for m in moe_layers(model)}
    check_model(model, "remove_experts")
    if not isinstance(experts, Mapping):
        raise PruneError(f"remove_experts: experts must map decoder-layer index → expert indices (e.g. {{0: [1, 3]}}), "
                         f"got {type(experts).__name__}")
    field = _BLOCKS[type(next(iter(layers.values())).block).__name__]
    _check_config(model, layers, field)
    plan: dict[int, list[int]] = {}
    for i, chosen in experts.items():
        if isinstance(i, bool) or not hasattr(type(i), "__index__") or i not in layers:
            raise PruneError(f"layer {i!r} is not a mixture-of-experts layer; MoE layers: {sorted(layers)}")
        m, ids = layers[i], _expert_ids(i, chosen, layers[i].num_experts)
        if m.num_experts - len(ids) < m.top_k:
            raise PruneError(f"removing {len(ids)} of the {m.num_experts} experts of layer {i} leaves fewer than "
                             f"top_k={m.top_k} (num_experts_per_tok); remove at most {m.num_experts - m.top_k}.")
        plan[i] = ids
    kept = {i: [e for e in range(m.num_experts) if e not in set(plan.get(i, ()))] for i, m in layers.items()}
    snapshot = {i: (m.router.weight, getattr(m.router, "bias", None), *(getattr(m.experts, t) for t in _EXPERT_TENSORS))
                for i, m in layers.items()}
    config_before = (getattr(model.config, field), getattr(model.config, EXPERTS_RECORD, None))
    try:
        for i, ids in plan.items():
            if ids:
                _slice_layer(layers[i], torch.tensor(kept[i], dtype=torch.long))
        record = _sync_config(model, {i: len(k) for i, k in kept.items()}, field)
    except Exception:
        for i, (w, b, *tensors) in snapshot.items():
            m = layers[i]
            m.router.weight = w
            if b is not None:
                m.router.bias = b
            for t, x in zip(_EXPERT_TENSORS, tensors, strict=True):
                setattr(m.experts, t, x)
            m.router.num_experts = m.experts.num_experts = int(w.shape[0])
        setattr(model.config, field, config_before[0])
        if config_before[1] is not None:
            setattr(model.config, EXPERTS_RECORD, config_before[1])
        raise
    return ExpertRemoval(removed={i: plan.get(i, []) for i in layers}, kept=kept,
                         top_k={i: m.top_k for i, m in layers.items()},
                         renormalised={i: m.renormalised for i, m in layers.items()}, per_layer_record=record)


def expert_plan(importance: Mapping[int, torch.Tensor], top_k: Mapping[int, int], fraction: float,
                budget: Literal["uniform", "global"] = "uniform") -> dict[int, list[int]]:
    """The least important experts to remove: ``fraction`` of each layer (``uniform``) or of all experts,
    ranked by each layer's share of its own importance (``global``); every layer keeps ≥ top_k."""
    if not 0.0 <= fraction < 1.0:
        raise SparsifyError(f"fraction must be in [0, 1), got {fraction}")
    if budget not in ("uniform", "global"):
        raise SparsifyError(f"unknown budget {budget!r}; use 'uniform' or 'global'")
    scores = {i: torch.as_tensor(v, dtype=torch.float64).cpu() for i, v in importance.items()}
    if any(not bool(torch.isfinite(v).all()) for v in scores.values()):
        raise SparsifyError("importance holds NaN or infinite values; give finite scores (compute them with "
                            "expert_importance)")
    order = {i: torch.argsort(v, stable=True).tolist() for i, v in scores.items()}
    room = {i: len(v) - top_k[i] for i, v in scores.items()}
    if budget == "uniform":
        return {i: sorted(order[i][:min(round(fraction * len(v)), room[i])]) for i, v in scores.items()}
    share = {i: v / v.sum() if float(v.sum()) > 0 else torch.zeros_like(v) for i, v in scores.items()}
    ranked = sorted((float(share[i][e]), i, e) for i in scores for e in range(len(scores[i])))
    target, plan = round(fraction * sum(len(v) for v in scores.values())), {i: [] for i in scores}
    for _, i, e in ranked:
        if sum(map(len, plan.values())) >= target:
            break
        if len(plan[i]) < room[i]:
            plan[i].append(e)
    return {i: sorted(ids) for i, ids in plan.items()}


def prune_experts(model: nn.Module, importance: Mapping[int, torch.Tensor], fraction: float = 0.5,
                  budget: Literal["uniform", "global"] = "uniform") -> ExpertRemoval:
    """``remove_experts(model, expert_plan(...))``: the least important ``fraction`` of the experts."""
    layers = {m.index: m for m in moe_layers(model)}
    missing = sorted(set(layers) - set(importance))
    wrong = [i for i, v in importance.items() if i in layers and len(v) != layers[i].num_experts]
    if missing or wrong:
        raise SparsifyError(f"importance must hold one vector per MoE layer of the model's current size "
                            f"(missing layers {missing}, wrong sizes {wrong}); compute it with expert_importance.")
    return remove_experts(model, expert_plan(importance, {i: m.top_k for i, m in layers.items()}, fraction, budget))


# ----- loading per-layer counts ------------------------------------------------------------------
def recorded_counts(config: Any) -> dict[int, int] | None:
    """The per-layer expert counts in ``config.sparsify_num_experts`` (None if absent)."""
    raw = getattr(config, EXPERTS_RECORD, None)
    if raw is None:
        return None
    try:
        return {int(i): int(n) for i, n in dict(raw).items()}
    except (TypeError, ValueError) as exc:
        raise SparsifyError(f"config.{EXPERTS_RECORD} must map layer index → expert count, got {raw!r:.200}") from exc


def resize_experts_(model: nn.Module, counts: Mapping[int, int]) -> None:
    """Give each MoE layer ``counts[i]`` experts (the first ones; values to be overwritten by loading)."""
    layers = {m.index: m for m in moe_layers(model)}
    if set(counts) != set(layers) or any(not layers[i].top_k <= n <= layers[i].num_experts for i, n in counts.items()):
        raise SparsifyError(f"expert counts {dict(counts)} do not fit the MoE layers {sorted(layers)} (each between "
                            "top_k and the config's expert count)")
    for i, n in counts.items():
        if n != layers[i].num_experts:
            _slice_layer(layers[i], torch.arange(n))


def from_pretrained_with_counts(path: Any, cls: type, resize: Callable[[nn.Module], None] | None = None,
                                **kwargs: Any) -> nn.Module:
    """``cls.from_pretrained(path)`` for a checkpoint whose MoE layers have different expert counts
    (``config.sparsify_num_experts``): each layer is resized as the model is built, so transformers loads
    every tensor (any of its checkpoint formats) into a model of the saved shapes, strictly. ``resize``:
    also applied to the model as it is built (the per-layer attention widths of ``sparsify.hf``)."""
    from transformers import AutoConfig

    counts = recorded_counts(kwargs.get("config") or AutoConfig.from_pretrained(path))

    class Resized(cls):  # type: ignore[misc, valid-type]
        def __init__(self, config: Any, *args: Any, **kw: Any) -> None:
            super().__init__(config, *args, **kw)
            if counts is not None:
                resize_experts_(self, counts)
            if resize is not None:
                resize(self)

    Resized.__name__, Resized.__qualname__ = cls.__name__, cls.__qualname__
    model = Resized.from_pretrained(path, **kwargs)
    model.__class__ = cls  # Resized adds no state: the model is a plain cls from here on
    return model
