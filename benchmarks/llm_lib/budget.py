"""Parameter counts and the search for the pruning ratio that meets a parameter target.

Parameters are counted once per tensor (tied input/output embeddings count once), embedding included;
``non_embedding`` leaves the input embedding matrix out. The target of "25 % fewer parameters" is
``round(0.75 · total)`` of the dense model's total. The recovery budget is a fraction of the pretraining
tokens that ``training.json`` records.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from torch import nn

TOLERANCE = 0.01  # a method meets its target when its total is within 1 % of the target's total


def count_params(model: nn.Module) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings().weight.numel() if hasattr(model, "get_input_embeddings") else 0
    return {"total": total, "embedding": embedding, "non_embedding": total - embedding}


def target_params(dense_total: int, fewer: float) -> int:
    return round((1.0 - fewer) * dense_total)


def within(params: int, target: int, tolerance: float = TOLERANCE) -> bool:
    return abs(params - target) <= tolerance * target


def search_ratio(params_at: Callable[[float], float], target: float, *, low: float = 0.0, high: float = 0.95,
                 iters: int = 24, tolerance: float = 0.002) -> float:
    """The ratio in [low, high] whose ``params_at(ratio)`` (decreasing in the ratio) is closest to ``target``.

    Bisection; stops early once within ``tolerance`` (relative) of the target.
    """
    best, best_gap = low, float("inf")
    for _ in range(iters):
        mid = 0.5 * (low + high)
        value = params_at(mid)
        gap = abs(value - target) / target
        if gap < best_gap:
            best, best_gap = mid, gap
        if gap <= tolerance:
            break
        if value > target:
            low = mid
        else:
            high = mid
    return best


RECOVERY_FRACTION = 0.02  # the recovery budget: at most 2 % of the pretraining tokens


def pretraining_tokens(model_dir: Path) -> int | None:
    """Tokens the kept weights were trained on, from the ``training.json`` that ``benchmarks.llm_train`` writes.

    The kept weights are those of the best held-out step, so that step's tokens count
    (``best_step × batch_size × seq_len``), not ``tokens_seen`` of the whole run."""
    path = Path(model_dir) / "training.json"
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    config, best_step = record.get("config") or {}, record.get("best_step")
    if best_step and config.get("batch_size") and config.get("seq_len"):
        return int(best_step) * int(config["batch_size"]) * int(config["seq_len"])
    seen = record.get("tokens_seen")
    return int(seen) if seen else None


def recovery_steps(pretrained: int | None, batch: int, seq_len: int, fraction: float = RECOVERY_FRACTION,
                   fallback: int = 100) -> int:
    """The most recovery steps of ``batch × seq_len`` tokens within ``fraction`` of ``pretrained`` tokens."""
    if not pretrained:
        return fallback
    return int(fraction * pretrained) // (batch * seq_len)
