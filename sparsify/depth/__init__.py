"""Depth pruning of any residual network: find residual branches, score them, remove them physically.

    branches = residual_branches(model, x)              # every ``f`` of a module's ``x + f(x)``
    scores = branch_importance(model, branches, [x])    # relative change of each block's output without it
    remove_residual_branches(model, [b for b, s in zip(branches, scores) if s < 0.05])

Removal is exact whenever the removed branches output zeros (zero their last layer softly first, or accept
the change and fine-tune). For a latency target: ``depth_then_width`` (:mod:`sparsify.depth.target`), built
on ``rank_for_latency`` and ``fewest_for_latency`` (:mod:`sparsify.depth.latency`). Decoder layers of Hugging
Face models: :mod:`sparsify.hf.depth`.
"""

from sparsify.depth.branches import ResidualBranch, residual_branches, untraced_modules
from sparsify.depth.importance import branch_importance
from sparsify.depth.latency import branch_ms, fewest_for_latency, rank_for_latency, shallower_copy
from sparsify.depth.removal import remove_residual_branches, without_branches
from sparsify.depth.target import DepthAttempt, DepthForLatency, depth_then_width

__all__ = ["DepthAttempt", "DepthForLatency", "ResidualBranch", "branch_importance", "branch_ms", "depth_then_width",
           "fewest_for_latency", "rank_for_latency", "remove_residual_branches", "residual_branches", "shallower_copy",
           "untraced_modules", "without_branches"]
