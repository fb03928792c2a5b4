"""torch-kirigami (PyPI ``torch-kirigami``, fx-based structured pruning) as a peer arm of the CIFAR harness.

Its magnitude workflow, one-shot: candidates from its dependency graph (``Pruner.discover_candidates``),
scored once by its ``GroupMagnitude(p=2)``, removed in that global order and applied by its own
surgery (``Pruner.prune``), then fine-tuned. Its whole-model budgets are parameter counts or channel
ratios only, so the stopping point is ours: a strategy (its ``Strategy`` protocol) takes the shortest
prefix of its ranking whose pruned network has at most the MACs target, counted with sparsify's per-weight
MACs on the compact shapes kirigami's own dependency analysis gives (the final network is measured again
with sparsify's count, as for every arm). A candidate whose addition leaves the removal unresolved (a layer
emptied) is skipped, as its greedy strategies do.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from benchmarks.cifar_lib.arm_base import Arm
from sparsify.graph.cost import module_macs
from sparsify.graph.trace import trace

KIRIGAMI_VERSION = "0.2.1"  # the version the arm was written and tested against


def import_kirigami() -> Any:
    """The package, or a SystemExit that says how to install it (the arm fails before any training)."""
    try:
        import torch_kirigami
    except ImportError as exc:
        raise SystemExit(f"the kirigami arm needs torch-kirigami: pip install torch-kirigami=={KIRIGAMI_VERSION} "
                         f"({exc})") from None
    return torch_kirigami


class MacsPrefix:
    """A kirigami ``Strategy``: the shortest prefix of the metric's global ranking whose compact network
    has at most ``target`` MACs (``factor[ref]`` MACs per remaining element of each conv/linear weight)."""

    def __init__(self, metric: Any, factors: dict[Any, float], target: float) -> None:
        self.metric, self.factors, self.target = metric, factors, target
        self.info: dict[str, Any] = {}

    def macs(self, impact: Any) -> float:
        from torch_kirigami.pruning.types import require_compact_shape

        return sum(f * math.prod(require_compact_shape(impact, ref)) for ref, f in self.factors.items())

    def select(self, context: Any) -> Any:
        from torch_kirigami.pruning import StrategyResult

        candidates = list(context.candidates)
        scores = self.metric.score(context, tuple(candidates), accepted_impact=context.impact(()))
        order = sorted(range(len(candidates)), key=lambda i: (float(scores[i]), candidates[i].key))
        ranked = [candidates[i] for i in order]
        skipped: list[str] = []
        while True:
            k = self._shortest(context, ranked)
            bad = self._first_unresolved(context, ranked, k)
            if bad is None:
                break
            skipped.append(ranked.pop(bad).key)
        self.info.update({"kirigami_candidates": len(candidates), "kirigami_selected": k,
                          "kirigami_skipped": len(skipped)})
        return StrategyResult(keys=tuple(dict.fromkeys(c.key for c in ranked[:k])), stop_reason="target_reached")

    def _impact(self, context: Any, ranked: list, k: int) -> Any:
        return context.impact(tuple(s for c in ranked[:k] for s in c.remove))

    def _shortest(self, context: Any, ranked: list) -> int:
        """Bisection: the smallest k whose prefix reaches the target (MACs fall as the prefix grows)."""
        lo, hi = 0, len(ranked)
        if self.macs(self._impact(context, ranked, hi)) > self.target:
            raise SystemExit(f"kirigami: removing every candidate leaves more than {self.target:,.0f} MACs")
        while lo < hi:
            mid = (lo + hi) // 2
            if self.macs(self._impact(context, ranked, mid)) <= self.target:
                hi = mid
            else:
                lo = mid + 1
        return lo

    def _first_unresolved(self, context: Any, ranked: list, k: int) -> int | None:
        """Index of the candidate whose addition first makes the prefix unresolved; None if prefix k resolves."""
        if self._impact(context, ranked, k).status == "resolved":
            return None
        lo, hi = 1, k  # prefix hi is unresolved; the empty prefix resolves
        while lo < hi:
            mid = (lo + hi) // 2
            if self._impact(context, ranked, mid).status == "resolved":
                lo = mid + 1
            else:
                hi = mid
        return lo - 1


def kirigami_prune(model: nn.Module, example: torch.Tensor, ratio: float) -> dict[str, Any]:
    """Prune ``model`` in place with torch-kirigami to ``ratio``× fewer MACs (sparsify's count); returns its info."""
    kirigami = import_kirigami()
    from importlib.metadata import version

    from torch_kirigami.pruning import GroupMagnitude, ParameterBudget, Pruner

    x = example[:2]
    macs = module_macs(trace(model, x[:1]))
    params = dict(model.named_parameters())
    graph = kirigami.DependencyGraph.build(model, args=(x,))
    by_tensor = {id(t): ref for ref, t in graph.tensor_bindings()}
    factors = {by_tensor[id(params[name])]: m / params[name].numel() for name, m in macs.items()}
    strategy = MacsPrefix(GroupMagnitude(p=2), factors, sum(macs.values()) / ratio)
    pruner = Pruner(model, graph=graph)
    space = pruner.discover_candidates()
    budget = ParameterBudget(max_params=sum(p.numel() for p in model.parameters()))  # the target is the strategy's
    pruner.prune(space, budget=budget, strategy=strategy)
    return {**strategy.info, "kirigami_version": version("torch-kirigami"),
            "kirigami_importance": "GroupMagnitude(p=2)"}


class Kirigami(Arm):
    """torch-kirigami's magnitude workflow: one-shot global GroupMagnitude pruning of the converged dense model
    to the MACs target at the start of the phase, then S+F epochs of fine-tuning (as ``l1_oneshot``)."""

    name = "kirigami"
    prunes = True
    prune_at_start = True

    def setup(self, model: nn.Module, example: torch.Tensor) -> None:
        import_kirigami()  # fail before training when the package is absent

    def prune(self, model: nn.Module, example: torch.Tensor) -> None:
        self.info.update(kirigami_prune(model, example, self.ratio))
