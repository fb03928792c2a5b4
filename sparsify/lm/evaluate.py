"""Held-out perplexity, tokens/s and memory of a causal LM, and an optional lm-eval hook.

Works with any module whose ``forward(input_ids=...)`` returns logits (``.logits`` or a tensor),
e.g. a Hugging Face ``*ForCausalLM`` before or after ``sparsify.hf`` pruning, on any device.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from sparsify.errors import SparsifyError
from sparsify.hf.inputs import check_ids, vocab_size
from sparsify.measure.timing import measure_latency

__all__ = ["lm_eval_tasks", "peak_memory", "perplexity", "throughput"]


def _logits(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=input_ids)
    logits = out if isinstance(out, torch.Tensor) else getattr(out, "logits", None)
    if logits is None:
        raise SparsifyError(f"{type(model).__name__} returned {type(out).__name__} without logits: evaluate a "
                            "language model (e.g. a *ForCausalLM, not the bare base model)")
    return logits


def _device_of(model: torch.nn.Module) -> torch.device:
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def _as_tensor(tokens: torch.Tensor | np.ndarray | Sequence[int]) -> torch.Tensor:
    """The token stream as a 1-D tensor (a (1, N) batch of one row is accepted), its dtype kept."""
    t = tokens if isinstance(tokens, torch.Tensor) else torch.as_tensor(np.asarray(tokens))
    if t.dim() == 2 and t.shape[0] == 1:
        t = t[0]
    if t.dim() != 1:
        raise SparsifyError(f"perplexity scores one 1-D token stream, got shape {tuple(t.shape)}; concatenate the "
                            "documents (tokens.flatten() if the rows are consecutive text)")
    return t


def _max_positions(model: torch.nn.Module) -> int | None:
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


def _check_sizes(model: torch.nn.Module, seq_len: Any, batch_size: Any, max_batches: Any) -> None:
    def count(v: Any, low: int) -> bool:
        return not isinstance(v, bool) and isinstance(v, int) and v >= low

    if not count(seq_len, 2) or not count(batch_size, 1) or not (max_batches is None or count(max_batches, 1)):
        raise SparsifyError(f"perplexity needs ints seq_len ≥ 2, batch_size ≥ 1 and max_batches ≥ 1 or None; got "
                            f"seq_len={seq_len!r}, batch_size={batch_size!r}, max_batches={max_batches!r}")
    limit = _max_positions(model)
    if limit is not None and seq_len > limit:
        raise SparsifyError(f"perplexity: seq_len={seq_len} is longer than the model's {limit} positions "
                            "(config.max_position_embeddings); pass seq_len ≤ that")


@torch.no_grad()
def perplexity(model: torch.nn.Module, tokens: torch.Tensor | np.ndarray | Sequence[int], *, seq_len: int = 512,
               batch_size: int = 8, max_batches: int | None = None) -> dict[str, float]:
    """Perplexity of ``model`` on ``tokens`` (a 1-D token stream, e.g. a held-out split).

    The stream is cut into non-overlapping windows of ``seq_len`` tokens (a shorter tail is dropped);
    in each window every token after the first is predicted from those before it, so a window scores
    ``seq_len - 1`` tokens, exactly what Hugging Face's ``loss`` with ``labels=input_ids`` averages.
    The result is ``exp`` of the mean NLL over all scored tokens (log-softmax in float32, sums in
    float64), with ``nll`` (that mean, nats per token) and ``tokens`` (how many were scored).
    Runs in eval mode under whatever autocast the caller set; the model's mode is restored.
    """
    _check_sizes(model, seq_len, batch_size, max_batches)
    stream = _as_tensor(tokens)
    if stream.numel():
        check_ids(stream, vocab_size(model), "perplexity", dims=1)
    stream = stream.long()
    windows = stream.numel() // seq_len
    if windows == 0:
        raise SparsifyError(f"perplexity got {stream.numel()} tokens, fewer than one window of seq_len={seq_len}: "
                            "pass more tokens or a smaller seq_len")
    windows = stream[: windows * seq_len].view(windows, seq_len)
    device, was_training = _device_of(model), model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for index, start in enumerate(range(0, len(windows), batch_size)):
            if max_batches is not None and index >= max_batches:
                break
            batch = windows[start:start + batch_size].to(device)
            logits = _logits(model, batch)[:, :-1].float()
            nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
            total += float(nll.double())
            count += batch[:, 1:].numel()
    finally:
        model.train(was_training)
    mean = total / count
    return {"ppl": math.exp(mean), "nll": mean, "tokens": count}


@torch.no_grad()
def throughput(model: torch.nn.Module, *, batch_size: int = 8, seq_len: int = 512, vocab_size: int | None = None,
               new_tokens: int = 0, prompt_len: int = 32, iters: int = 10, warmup: int = 3,
               seed: int = 0) -> dict[str, float]:
    """Tokens per second of a forward pass over ``batch_size × seq_len`` random tokens (median of ``iters``).

    With ``new_tokens > 0`` also of greedy generation with the KV cache (``model.generate``, HF
    models): ``batch_size × new_tokens`` new tokens after a ``prompt_len`` prompt. Timed with CUDA
    events on GPUs (``sparsify.measure.measure_latency``), ``perf_counter`` elsewhere, after warm-up.
    """
    sizes = {"batch_size": batch_size, "seq_len": seq_len, "prompt_len": prompt_len}
    bad = {k: v for k, v in sizes.items() if isinstance(v, bool) or not isinstance(v, int) or v < 1}
    if bad or isinstance(new_tokens, bool) or not isinstance(new_tokens, int) or new_tokens < 0:
        raise SparsifyError(f"throughput needs ints batch_size, seq_len, prompt_len ≥ 1 and new_tokens ≥ 0; got "
                            f"{bad or {'new_tokens': new_tokens}}")
    if new_tokens > 0 and prompt_len > seq_len:
        raise SparsifyError(f"throughput: prompt_len={prompt_len} is longer than seq_len={seq_len} (the prompt is "
                            "cut from the forward batch); pass prompt_len ≤ seq_len")
    vocab_size = vocab_size or getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab_size is None:
        raise SparsifyError("throughput needs vocab_size for a model without .config.vocab_size")
    device, was_training = _device_of(model), model.training
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(vocab_size, (batch_size, seq_len), generator=generator).to(device)
    model.eval()
    try:
        forward_ms = statistics.median(measure_latency(lambda: _logits(model, ids), iters=iters, warmup=warmup,
                                                       device=device))
        result = {"forward_tokens_per_s": batch_size * seq_len / (forward_ms / 1e3), "forward_ms": forward_ms}
        if new_tokens > 0:
            prompt = ids[:, :prompt_len]
            kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, use_cache=True,
                          pad_token_id=getattr(model.config, "pad_token_id", None) or 0)
            gen_ms = statistics.median(measure_latency(lambda: model.generate(prompt, **kwargs),
                                                       iters=max(1, iters // 2), warmup=min(1, warmup), device=device))
            result.update(generate_tokens_per_s=batch_size * new_tokens / (gen_ms / 1e3), generate_ms=gen_ms)
    finally:
        model.train(was_training)
    return result


def peak_memory(model: torch.nn.Module, fn: Callable[[], Any] | None = None, *, batch_size: int = 8,
                seq_len: int = 512) -> dict[str, int | None]:
    """Bytes of the model's weights and buffers, and the peak CUDA memory of running ``fn`` once.

    ``fn`` defaults to one inference forward pass over ``batch_size × seq_len`` tokens. The peak is
    measured with ``torch.cuda.max_memory_allocated`` after resetting it, so it includes the weights;
    on other devices ``peak_bytes`` is None (only CUDA reports it).
    """
    device = _device_of(model)
    weights = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    if device.type != "cuda":
        return {"weight_bytes": weights, "peak_bytes": None}
    if fn is None:
        ids = torch.zeros(batch_size, seq_len, dtype=torch.long, device=device)

        def fn() -> None:
            with torch.no_grad():
                _logits(model, ids)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return {"weight_bytes": weights, "peak_bytes": torch.cuda.max_memory_allocated(device)}


def lm_eval_tasks(model: torch.nn.Module, tokenizer: Any, tasks: Sequence[str], *, batch_size: int = 8,
                  limit: int | float | None = None, **kwargs: Any) -> dict[str, dict]:
    """Run EleutherAI lm-evaluation-harness ``tasks`` on an in-memory HF model; returns ``results``.

    For users with their own (pretrained, then pruned) models and the task data at hand: lm-eval is
    imported only here (``pip install lm-eval``); extra ``kwargs`` go to ``lm_eval.simple_evaluate``.
    """
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError as error:
        raise SparsifyError("lm_eval_tasks needs the lm-evaluation-harness: `pip install lm-eval` "
                            f"(import failed: {error})") from error
    if isinstance(tasks, str) or not tasks:
        raise SparsifyError(f"tasks must be a non-empty list of lm-eval task names, got {tasks!r}")
    wrapped = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    output = lm_eval.simple_evaluate(model=wrapped, tasks=list(tasks), limit=limit, **kwargs)
    return output["results"]
