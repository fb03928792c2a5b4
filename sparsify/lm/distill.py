"""Recovery after pruning: knowledge distillation from the dense model (and optional LoRA via peft).

:func:`distill` trains ``student`` towards ``teacher`` on ``batches``: the loss is
``alpha · T² · KL(softmax(teacher/T) ‖ softmax(student/T))`` over the tokens (Hinton et al.), plus
``(1 − alpha) ·`` the student's own LM loss (the batches then carry ``labels``), plus
``hidden_weight ·`` the mean squared error between hidden states of matching layers whose widths agree
(HF ``output_hidden_states``; layers paired by relative depth when the depths differ). The teacher
runs in eval mode under ``no_grad`` and is left as it was; on CUDA both run under bf16 autocast.

With a Sparsifier it runs between prune steps: pass your optimizer and ``on_step=lambda i: sp.step()``,
then ``sp.prune(optimizer=opt)`` slices the optimizer state with the weights and the next
``distill(..., optimizer=opt)`` continues with it. :func:`with_lora` wraps a student in peft LoRA
adapters (peft imported lazily): only the adapters train; ``merge_and_unload()`` folds them back.

``schedule="cosine"`` scales every parameter group's learning rate per step: a linear warm-up over
``warmup_steps``, then a cosine decay to ``min_lr_ratio`` of it at the last step (the groups' own
learning rates are put back at the end, so a passed optimizer continues as it was).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from sparsify.errors import SparsifyError
from sparsify.hf.inputs import check_batch, vocab_size


def _cycle(batches: Iterable[Any]) -> Iterator[Any]:
    while True:
        n = 0
        for batch in batches:
            n += 1
            yield batch
        if n == 0:
            raise SparsifyError("distill: batches gave no batch (an iterator is used up after one pass); pass a "
                                "list of batches, or another iterable that can be read again")


def _check(batch: Any, vocab: int | None, values: bool) -> None:
    """A dict of model inputs with well-formed ``input_ids`` (inside ``vocab`` where ``values``)."""
    if not isinstance(batch, dict):
        raise SparsifyError(f"distill: a batch must be a dict of model inputs (input_ids, attention_mask, labels), "
                            f"got {type(batch).__name__}")
    check_batch(batch, vocab, "distill", values=values)


def _to(batch: Any, device: torch.device, vocab: int | None = None) -> dict[str, Any]:
    """The batch on ``device``, its shapes and dtypes checked (no device sync)."""
    _check(batch, vocab, values=False)
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _check_pair(student: nn.Module, teacher: nn.Module) -> None:
    """Refuse a teacher that is (or shares parameters with) the student, or lives on another device."""
    if teacher is student:
        raise SparsifyError("distill: teacher is the student itself (it would learn towards its own moving output); "
                            "pass the dense model as teacher, e.g. a copy.deepcopy(model) taken before pruning")
    shared = {id(p) for p in student.parameters()} & {id(p) for p in teacher.parameters()}
    if shared:
        raise SparsifyError(f"distill: teacher and student share {len(shared)} parameters (a shallow copy?); "
                            "pass a teacher made with copy.deepcopy(model) before pruning")
    s_dev = {p.device for p in student.parameters()}
    t_dev = {p.device for p in teacher.parameters()}
    if len(s_dev) == 1 and len(t_dev) == 1 and s_dev != t_dev:
        raise SparsifyError(f"distill: the student is on {s_dev.pop()} and the teacher on {t_dev.pop()}; "
                            "move both to one device (teacher.to(device))")
    s_vocab, t_vocab = vocab_size(student), vocab_size(teacher)
    if s_vocab is not None and t_vocab is not None and s_vocab != t_vocab:
        raise SparsifyError(f"distill: the student's vocabulary has {s_vocab} tokens and the teacher's {t_vocab}; "
                            "distil between models with one tokenizer")


def _get(output: Any, name: str) -> Any:
    return output.get(name) if isinstance(output, dict) else getattr(output, name, None)


def _kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float, mask: torch.Tensor | None) -> torch.Tensor:
    """T² · KL(teacher ‖ student) per token, averaged over the (unmasked) tokens."""
    if student.shape != teacher.shape:
        raise SparsifyError(f"distill: student logits {tuple(student.shape)} and teacher logits "
                            f"{tuple(teacher.shape)} differ; the vocabularies must agree")
    s = F.log_softmax(student.float() / temperature, -1).reshape(-1, student.shape[-1])
    t = F.log_softmax(teacher.float() / temperature, -1).reshape(-1, teacher.shape[-1])
    per_token = F.kl_div(s, t, log_target=True, reduction="none").sum(-1)
    if mask is not None:
        m = mask.reshape(-1).to(per_token.dtype)
        return temperature**2 * (per_token * m).sum() / m.sum().clamp_min(1)
    return temperature**2 * per_token.mean()


def _hidden_mse(student: tuple[torch.Tensor, ...], teacher: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Mean over paired layers of the MSE of hidden states, pairing layers by relative depth."""
    ns, nt = len(student), len(teacher)
    pairs = [(s, teacher[round(i * (nt - 1) / max(ns - 1, 1))]) for i, s in enumerate(student)]
    pairs = [(s, t) for s, t in pairs if s.shape == t.shape]
    if not pairs:
        raise SparsifyError("distill: hidden_weight > 0 but no student hidden state has the width of the teacher's "
                            "(the hidden size was pruned); set hidden_weight=0")
    return torch.stack([F.mse_loss(s.float(), t.float()) for s, t in pairs]).mean()


def lr_factor(step: int, steps: int, warmup_steps: int, min_lr_ratio: float) -> float:
    """The learning-rate factor of step ``step`` of ``steps`` (0-based): linear warm-up, then cosine."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(steps - warmup_steps - 1, 1)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def distill(student: nn.Module, teacher: nn.Module, batches: Iterable[dict[str, Any]], steps: int,
            lr: float = 1e-4, temperature: float = 2.0, alpha: float = 1.0, hidden_weight: float = 0.0,
            optimizer: torch.optim.Optimizer | None = None, *, max_grad_norm: float | None = 1.0,
            on_step: Callable[[int], None] | None = None, autocast: bool | None = None,
            schedule: Literal["constant", "cosine"] = "constant", warmup_steps: int = 0,
            min_lr_ratio: float = 0.0) -> list[dict[str, float]]:
    """Distil ``teacher`` into ``student`` for ``steps`` optimizer steps (see the module docstring).

    ``batches`` are dicts of model inputs, cycled; ``optimizer`` defaults to AdamW(lr) over the student's
    trainable parameters (``lr`` is ignored when an optimizer is given); ``on_step(i)`` runs after each
    step (e.g. ``sp.step()``); ``autocast`` defaults to bf16 on CUDA. Returns one log entry a step
    (``loss``, ``kl``, ``lm``, ``hidden``), read back from the device once at the end.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise SparsifyError(f"distill: steps must be a positive int, got {steps!r}")
    if not (0.0 <= alpha <= 1.0) or not temperature > 0 or not hidden_weight >= 0:
        raise SparsifyError(f"distill: need 0 ≤ alpha ≤ 1, temperature > 0, hidden_weight ≥ 0; got alpha={alpha}, "
                            f"temperature={temperature}, hidden_weight={hidden_weight}")
    if schedule not in ("constant", "cosine") or not 0 <= warmup_steps < max(steps, 1) \
            or not 0.0 <= min_lr_ratio <= 1.0:
        raise SparsifyError(f"distill: schedule must be 'constant' or 'cosine', 0 ≤ warmup_steps < steps and "
                            f"0 ≤ min_lr_ratio ≤ 1; got schedule={schedule!r}, warmup_steps={warmup_steps}, "
                            f"min_lr_ratio={min_lr_ratio}")
    _check_pair(student, teacher)
    vocab = vocab_size(student)
    if isinstance(batches, Sequence):  # every batch checked before the first step: a bad one changes nothing
        for b in batches:
            _check(b, vocab, values=True)
    params = [p for p in student.parameters() if p.requires_grad]
    if optimizer is None:
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
            raise SparsifyError(f"distill: lr must be a number > 0, got {lr!r} (or pass an optimizer)")
        if not params:
            raise SparsifyError("distill: the student has no trainable parameter")
        optimizer = torch.optim.AdamW(params, lr=lr)
    device = next(student.parameters()).device
    use_autocast = device.type == "cuda" if autocast is None else autocast
    hidden = hidden_weight > 0
    log: list[dict[str, torch.Tensor]] = []
    modes = {m: m.training for m in [*student.modules(), *teacher.modules()]}
    batch_iter = _cycle(batches)
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    try:
        teacher.eval()
        student.train()
        for i in range(steps):
            if schedule == "cosine":
                factor = lr_factor(i, steps, warmup_steps, min_lr_ratio)
                for group, base in zip(optimizer.param_groups, base_lrs, strict=True):
                    group["lr"] = base * factor
            batch = _to(next(batch_iter), device, vocab)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_autocast):
                with torch.no_grad():
                    t_out = teacher(**{k: v for k, v in batch.items() if k != "labels"}, output_hidden_states=hidden)
                s_out = student(**batch, output_hidden_states=hidden) if hidden else student(**batch)
            kl = _kl(_get(s_out, "logits"), _get(t_out, "logits"), temperature, batch.get("attention_mask"))
            loss = alpha * kl
            lm = _get(s_out, "loss")
            if alpha < 1.0:
                if lm is None:
                    raise SparsifyError("distill: alpha < 1 mixes in the student's LM loss, but it returned none; "
                                        "put 'labels' in the batches or use alpha=1")
                loss = loss + (1.0 - alpha) * lm
            h = _hidden_mse(_get(s_out, "hidden_states"), _get(t_out, "hidden_states")) if hidden else None
            if h is not None:
                loss = loss + hidden_weight * h
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            optimizer.step()
            if on_step is not None:
                on_step(i)
            zero = kl.new_zeros(())
            log.append({"loss": loss.detach(), "kl": kl.detach(), "lm": zero if lm is None else lm.detach().float(),
                        "hidden": zero if h is None else h.detach()})
    finally:
        optimizer.zero_grad(set_to_none=True)
        for group, base in zip(optimizer.param_groups, base_lrs, strict=True):
            group["lr"] = base
        for m, mode in modes.items():
            m.training = mode
    values = torch.stack([torch.stack([e[k] for k in ("loss", "kl", "lm", "hidden")]) for e in log]).cpu().tolist()
    return [{"step": i, "loss": v[0], "kl": v[1], "lm": v[2], "hidden": v[3]} for i, v in enumerate(values)]


def with_lora(student: nn.Module, r: int = 8, alpha: int = 16, dropout: float = 0.0,
              target_modules: list[str] | str | None = None) -> nn.Module:
    """The student wrapped in peft LoRA adapters (frozen base weights); ``merge_and_unload()`` after training
    folds them back into a plain model. ``target_modules`` defaults to every Linear but the LM head."""
    try:
        import peft
    except ImportError as exc:
        raise SparsifyError("with_lora needs peft: pip install peft (or distil all weights with distill())") from exc
    if target_modules is None:
        target_modules = sorted({name.rsplit(".", 1)[-1] for name, m in student.named_modules()
                                 if isinstance(m, nn.Linear) and not name.endswith("lm_head")})
    config = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules)
    return peft.get_peft_model(student, config)
