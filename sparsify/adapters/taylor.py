"""``taylor``: first-order (or diagonal second-order) Taylor importance of coupled groups, LLM-Pruner style.

Removing structure s sets every weight it owns to zero; the loss changes by about
ΔL ≈ −Σ g·w + ½ Σ w²·H (g = ∂L/∂w, H the Hessian diagonal, here the empirical Fisher E[g²]). LLM-Pruner
(Ma et al., 2023) scores each weight by s = g·w (``order="first"``) or s = g·w − ½ w²·E[g²]
(``order="second_diag"``, its "mixed" form) and sums over every weight of the group: here over *all*
members of the coupled group (producing rows, consuming columns, norm scales, biases), which is
exactly the set of tensors the structure owns in the channel graph. ``granularity="element"`` sums
|s| (LLM-Pruner's element-wise importance), ``"structure"`` takes |Σ s| (its vector-wise form: the
first-order change of the loss when the whole structure goes).

Gradients are averaged over calibration batches: ``adapter.calibrate(model, batches, loss_fn=...)``
(the loss defaults to the model's own ``.loss``, else the cross-entropy of ``logits`` against the
batch's ``labels``), or ``adapter.accumulate()`` after your own ``loss.backward()``. Calibration runs
in eval mode and leaves the model as it was (gradients, ``requires_grad``, train/eval mode). The
statistics are one (two with ``second_diag``) tensor per covered parameter. With the Sparsifier the
adapter reads the gradients present when it is created (run ``loss.backward()`` first) or else
calibrates on the example inputs; only mask policies (``gmp``, :func:`sparsify.oneshot.apply_plan`)
accept it: the scores are computed, not learned.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import nn

from sparsify.adapters.base import AdapterConfig, ImportanceVector, effective_over_raw, original, register_adapter
from sparsify.adapters.filter_norm import FilterNormAdapter, _index, _tensor
from sparsify.adapters.scaled_members import scaled_members
from sparsify.errors import SparsifyError
from sparsify.graph.channel_graph import ChannelGraph, Member
from sparsify.graph.trace import as_args

LossFn = Callable[[Any, Any], torch.Tensor]
"""``loss_fn(output, batch) -> scalar loss``."""


class TaylorConfig(AdapterConfig):
    """Importance of a structure = Taylor estimate of the loss change when all its weights are removed."""

    kind: Literal["taylor"] = "taylor"
    order: Literal["first", "second_diag"] = Field(
        "first", description="first: s = g·w; second_diag: s = g·w − ½·w²·E[g²] (diagonal Fisher, LLM-Pruner)")
    granularity: Literal["element", "structure"] = Field(
        "element", description="element: Σ|s| over the structure's weights; structure: |Σ s|")
    include_inexact: bool = Field(False, description="also cover groups whose removal is inexact (a norm over the "
                                  "channels, e.g. a transformer's hidden width); prune() refuses those")


def default_loss(output: Any, batch: Any) -> torch.Tensor:
    """The model's own loss (``output.loss`` / ``output["loss"]``), else cross-entropy of the output's
    logits against ``batch["labels"]`` (ignoring -100)."""
    loss = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)
    if isinstance(loss, torch.Tensor):
        return loss
    labels = batch.get("labels") if isinstance(batch, dict) else None
    logits = output.get("logits") if isinstance(output, dict) else getattr(output, "logits", output)
    if isinstance(labels, torch.Tensor) and isinstance(logits, torch.Tensor):
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1))
    raise SparsifyError("taylor: cannot find a loss: the model returned no .loss and the batch has no 'labels' for "
                        "a cross-entropy; pass loss_fn=lambda output, batch: ... to calibrate()")


class TaylorStats:
    """Σ g (and Σ g² for second_diag) over calibration batches, per covered tensor name."""

    def __init__(self, second: bool) -> None:
        self.second = second
        self.grad_sum: dict[str, torch.Tensor] = {}
        self.sq_sum: dict[str, torch.Tensor] = {}
        self.samples = 0
        self.version = 0

    def add(self, grads: dict[str, torch.Tensor]) -> None:
        for name, g in grads.items():
            g = g.detach().to(torch.float32 if g.dtype in (torch.float16, torch.bfloat16) else g.dtype)
            prev = self.grad_sum.get(name)
            self.grad_sum[name] = g.clone() if prev is None else prev.add_(g)
            if self.second:
                prev = self.sq_sum.get(name)
                self.sq_sum[name] = g.pow(2) if prev is None else prev.add_(g.pow(2))
        self.samples += 1
        self.version += 1

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for d in (self.grad_sum, self.sq_sum) for t in d.values())


class TaylorAdapter(FilterNormAdapter):
    """Covers every prunable group with a producing tensor; its score sums over all the group's parameters."""

    config: TaylorConfig
    learnable: ClassVar[bool] = False  # computed scores: mask policies only

    def __init__(self, config: TaylorConfig) -> None:
        super().__init__(config)
        self.stats = TaylorStats(config.order == "second_diag")
        self._vectors: list[ImportanceVector] = []

    def vectors(self, cg: ChannelGraph, *, calibrate: bool = True) -> list[ImportanceVector]:
        out = []
        for group in cg.prunable_groups():
            if not group.exact and not self.config.include_inexact:
                self.skipped[group.name] = f"inexact ({group.inexact[0]}); set include_inexact=True to cover it"
                continue
            scaled = scaled_members(cg, group)
            owned = list({(m.tensor, m.dim): m for m in group.members
                          if isinstance(original(*_tensor(cg.model, m)), nn.Parameter)}.values())
            if not scaled or not owned:
                self.skipped[group.name] = "no parameter produces these channels"
                continue
            handle = {"model": cg.model, "owned": owned, "scaled": scaled, "cache": None}
            out.append(ImportanceVector(group.name, group, torch.arange(group.width).numpy(), self, handle=handle))
        self._vectors = out
        if calibrate and out and not any(t.is_meta for t in cg.model.parameters()):
            if any(t.grad is not None for t in self._params(out).values()):
                self.accumulate()  # the gradients of the user's backward pass
            else:
                try:
                    self.calibrate(cg.model, [tuple(cg.traced.inputs)])
                except Exception as exc:  # the user calibrates explicitly instead
                    warnings.warn(f"taylor adapter: could not calibrate on the example inputs ({type(exc).__name__}: "
                                  f"{exc}); call adapter.calibrate(model, batches, loss_fn=...) before pruning",
                                  stacklevel=2)
        return out

    @property
    def calibrated(self) -> bool:
        return self.stats.samples > 0

    def _params(self, vectors: list[ImportanceVector] | None = None) -> dict[str, torch.Tensor]:
        vectors = self._vectors if vectors is None else vectors
        return {m.tensor: original(*_tensor(v.handle["model"], m)) for v in vectors for m in v.handle["owned"]}

    def accumulate(self, vectors: list[ImportanceVector] | None = None) -> None:
        """Add the gradients present now (after your ``loss.backward()``) as one calibration sample."""
        params = self._params(vectors)
        missing = [n for n, p in params.items() if p.grad is None]
        if missing:
            raise SparsifyError(f"taylor: {len(missing)} covered parameters have no gradient (e.g. {missing[:3]}); "
                                "run loss.backward() with a loss that reaches them before accumulate()")
        self.stats.add({n: p.grad for n, p in params.items()})

    def calibrate(self, model: nn.Module, batches: Iterable[Any], *, loss_fn: LossFn | None = None,
                  vectors: list[ImportanceVector] | None = None, reset: bool = True) -> TaylorStats:
        """Forward and backward on every batch (eval mode), accumulating the covered parameters' gradients;
        the model's gradients, ``requires_grad`` flags and train/eval modes are restored afterwards."""
        if vectors is not None:
            self._vectors = vectors
        if any(t.is_meta for t in model.parameters()):
            raise SparsifyError("cannot calibrate a model on the meta device (it has no weights); calibrate the "
                                "real model, or plan on the meta model with sparsify.oneshot.make_plan")
        if reset:
            self.stats = TaylorStats(self.config.order == "second_diag")
        loss_fn = default_loss if loss_fn is None else loss_fn
        params = self._params()
        every = list(model.parameters())
        grads, flags = [p.grad for p in every], [p.requires_grad for p in every]
        modes = {m: m.training for m in model.modules()}
        samples = self.stats.samples
        try:
            model.eval()
            for p in params.values():
                p.requires_grad_(True)
            for batch in batches:
                for p in every:
                    p.grad = None
                args, kwargs = as_args(batch)
                with torch.enable_grad():
                    loss_fn(model(*args, **kwargs), batch).backward()
                self.accumulate()
        finally:
            for p, g, f in zip(every, grads, flags, strict=True):
                p.grad = g
                p.requires_grad_(f)
            for m, mode in modes.items():
                m.training = mode
        if self.stats.samples == samples:
            raise SparsifyError("calibrate() got no batches; pass an iterable of example inputs")
        return self.stats

    def raw(self, vector: ImportanceVector) -> torch.Tensor:
        if not self.calibrated:
            raise SparsifyError(f"taylor: group '{vector.name}' has no gradients yet; call adapter.calibrate(model, "
                                "batches) or run loss.backward() and adapter.accumulate() before reading scores")
        model, owned = vector.handle["model"], vector.handle["owned"]
        weights = [original(*_tensor(model, m)) for m in owned]
        key = (self.stats.version, id(self.stats), *((id(w), w._version) for w in weights))
        cache = vector.handle["cache"]
        if cache is not None and cache[0] == key:
            return cache[1]
        n = self.stats.samples
        total = None
        for m, w in zip(owned, weights, strict=True):
            s = self._saliency(m, w.detach(), n)
            per_index = s.movedim(m.dim, 0).reshape(s.shape[m.dim], -1)
            per_index = (per_index.abs() if self.config.granularity == "element" else per_index).sum(1)
            per_structure = torch.zeros(len(vector), dtype=per_index.dtype, device=per_index.device)
            per_structure = per_structure.index_add(0, _index(vector, m, per_index.device), per_index)
            total = per_structure if total is None else total + per_structure.to(total.device)
        total = total.abs() if self.config.granularity == "structure" else total
        vector.handle["cache"] = (key, total)
        return total

    def _saliency(self, member: Member, w: torch.Tensor, n: int) -> torch.Tensor:
        g = self.stats.grad_sum.get(member.tensor)
        if g is None:
            raise SparsifyError(f"taylor: no gradient was accumulated for {member.tensor}; calibrate again after the "
                                "model changed (its covered parameters changed since the last calibration)")
        w = w.to(g.dtype)
        s = g.to(w.device) / n * w
        if self.config.order == "second_diag":
            s = s - 0.5 * w.pow(2) * self.stats.sq_sum[member.tensor].to(w.device) / n
        return s

    def factor(self, vector: ImportanceVector) -> torch.Tensor:
        mask = getattr(vector.transform, "mask", None)
        return mask if isinstance(mask, torch.Tensor) else effective_over_raw(vector)

    def install(self, vector: ImportanceVector, transform: nn.Module) -> None:
        if getattr(transform, "constant_factor", None) is None:
            raise SparsifyError(f"adapter 'taylor' computes its scores from gradients, it has no learnable vector for "
                                f"a {type(transform).__name__}: use policy='gmp' (or sparsify.oneshot.apply_plan)")
        super().install(vector, transform)


register_adapter("taylor", TaylorConfig, TaylorAdapter)
