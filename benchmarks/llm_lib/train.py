"""The training loop of the decoders: bf16 autocast, AdamW, warm-up then cosine, a wall-clock or token budget.

Batches are non-overlapping windows of ``seq_len + 1`` tokens of the train split, shuffled per epoch
by a seeded generator. The learning-rate schedule runs on ``progress`` = the larger of the time and
token fractions used, so a run stopped by ``--minutes`` still ends its cosine; a run stopped by
``--tokens`` alone (no time budget) repeats the same data order and schedule for a seed (on CPU
bit for bit; on GPUs up to the nondeterminism of some kernels, e.g. index backward). Held-out perplexity
is measured every ``eval_every`` steps and the best weights are the ones kept.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.llm_lib.models import build_model, parameter_counts
from sparsify.lm.evaluate import perplexity


@dataclass
class TrainConfig:
    model: str = "llama"
    minutes: float | None = 8.0  # wall-clock budget of the loop (None: tokens only)
    tokens: int | None = None  # token budget (None: time only)
    seq_len: int = 512
    batch_size: int = 64
    lr: float = 1.5e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 200
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 250
    eval_batches: int = 40  # held-out batches of batch_size windows per evaluation (None-like: 0 = all)
    seed: int = 0
    compile: bool = False
    tiny: bool = False
    device: str = field(default_factory=lambda: "cuda" if torch.cuda.is_available() else "cpu")

    def __post_init__(self) -> None:
        if self.minutes is None and self.tokens is None:
            raise ValueError("give a time budget (minutes) or a token budget (tokens), or both")


def train_batches(tokens: torch.Tensor, seq_len: int, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless ``[batch_size, seq_len + 1]`` int64 batches: non-overlapping windows, reshuffled each epoch."""
    windows = (len(tokens) - 1) // seq_len
    if windows < batch_size:
        raise ValueError(f"{len(tokens)} train tokens make {windows} windows of {seq_len}, fewer than a batch "
                         f"of {batch_size}")
    generator = torch.Generator().manual_seed(seed)
    offsets = torch.arange(seq_len + 1, device=tokens.device)
    while True:
        order = torch.randperm(windows, generator=generator)
        for start in range(0, windows - batch_size + 1, batch_size):
            starts = (order[start:start + batch_size] * seq_len).to(tokens.device)
            yield tokens[starts[:, None] + offsets].long()


def lr_factor(progress: float, step: int, config: TrainConfig) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine from 1 to ``min_lr_ratio`` over ``progress`` ∈ [0, 1]."""
    warm = min(1.0, (step + 1) / max(1, config.warmup_steps))
    cosine = config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return warm * cosine


def _loss(model: torch.nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(total loss, language-model loss): cross-entropy in float32, plus the router's balance loss for MoE."""
    moe = getattr(model.config, "num_local_experts", None) is not None
    out = model(input_ids=batch[:, :-1], **({"output_router_logits": True} if moe else {}))
    logits = out.logits.float()
    lm = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
    aux = getattr(out, "aux_loss", None)
    total = lm if aux is None else lm + model.config.router_aux_loss_coef * aux
    return total, lm


def train(config: TrainConfig, tokens: dict[str, np.ndarray], vocab_size: int,
          log: Callable[[str], None] = print) -> tuple[torch.nn.Module, dict]:
    """Train a fresh ``config.model`` on ``tokens["train"]``; returns the best model (by held-out ppl) and a record."""
    device = torch.device(config.device)
    torch.manual_seed(config.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    model = build_model(config.model, vocab_size, tiny=config.tiny, seed=config.seed,
                        max_positions=max(1024, config.seq_len)).to(device)
    train_tokens = torch.from_numpy(tokens["train"].astype(np.int32)).to(device)
    heldout = torch.from_numpy(tokens["heldout"].astype(np.int64))
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=config.lr, betas=(0.9, 0.95),
                                  eps=1e-8, **({"fused": True} if device.type == "cuda" else {}))
    step_model = torch.compile(model) if config.compile else model
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)
    batches = train_batches(train_tokens, config.seq_len, config.batch_size, config.seed)
    tokens_per_step = config.batch_size * config.seq_len
    budget_s = None if config.minutes is None else config.minutes * 60

    def evaluate() -> float:
        with autocast:
            return perplexity(model, heldout, seq_len=config.seq_len, batch_size=config.batch_size,
                              max_batches=config.eval_batches or None)["ppl"]

    history, best = [], (math.inf, None, 0)
    step, seen, start, train_loss = 0, 0, time.perf_counter(), float("nan")
    model.train()
    while True:
        elapsed = time.perf_counter() - start
        progress = max(0.0 if budget_s is None else elapsed / budget_s,
                       0.0 if config.tokens is None else seen / config.tokens)
        done = progress >= 1.0
        if done or (step > 0 and step % config.eval_every == 0):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            ppl = evaluate()
            history.append({"step": step, "tokens": seen, "seconds": round(elapsed, 1), "train_loss": train_loss,
                            "heldout_ppl": ppl})
            log(f"step {step:6d}  tokens {seen / 1e6:8.1f}M  {seen / max(elapsed, 1e-9) / 1e3:8.1f}k tok/s  "
                f"train loss {train_loss:.3f}  held-out ppl {ppl:.2f}")
            if ppl < best[0]:
                best = (ppl, {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}, step)
        if done:
            break
        for group in optimizer.param_groups:
            group["lr"] = config.lr * lr_factor(progress, step, config)
        with autocast:
            loss, lm_loss = _loss(step_model, next(batches))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        step, seen = step + 1, seen + tokens_per_step
        if step % 50 == 0 or step == 1:
            train_loss = float(lm_loss.detach())
    seconds = time.perf_counter() - start
    model.load_state_dict(best[1])
    record = {"config": asdict(config), "vocab_size": vocab_size, "parameters": parameter_counts(model),
              "steps": step, "tokens_seen": seen, "seconds": round(seconds, 1),
              "train_tokens_per_s": round(seen / seconds), "epochs": round(seen / len(tokens["train"]), 2),
              "best_step": best[2], "heldout_ppl": best[0], "final_heldout_ppl": history[-1]["heldout_ppl"],
              "heldout_tokens": len(tokens["heldout"]), "train_tokens": len(tokens["train"]),
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
              "torch": torch.__version__, "attention": model.config._attn_implementation,
              "experts": getattr(model.config, "_experts_implementation", None), "history": history}
    return model, record
