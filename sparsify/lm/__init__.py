"""Evaluation of (pruned) causal language models: held-out perplexity, speed, memory, an lm-eval hook."""

from sparsify.lm.evaluate import lm_eval_tasks, peak_memory, perplexity, throughput

__all__ = ["lm_eval_tasks", "peak_memory", "perplexity", "throughput"]
