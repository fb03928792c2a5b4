"""Hidden size (the residual stream) of LLaMA-style decoders, chosen and compensated from calibration data.

Removing residual channels is never exact: every RMSNorm divides by the root mean square over *all*
channels, so the kept channels' normalised values change with each token. The channel graph therefore
marks the residual group inexact, the oracle refuses it, and this module offers the calibrated path:

1. ``hidden_importance``: per hidden channel, Σ over the stream's norm sites (each layer's two norms and
   the final one) of E[y_j²]·‖W[:, j]‖², y the norm output and W the Linear layers reading it (the output
   energy those layers lose without channel j; ``score="energy"``: the plain mean of E[x̂_j²], x̂ = x / rms(x)).
2. ``prune_hidden`` removes the weakest channels physically (embedding, q/k/v/o, gate/up/down, every norm,
   the LM head; ``config.hidden_size`` synced; all-or-nothing, no tracing: the layout is checked instead), and
   compensates from second moments measured on the same batches, per norm site. After pruning, a consumer
   sees y' = y_K·r with r = rms(x) / rms(x_K) per token (K: kept channels). ``compensate=``:

   - ``"lstsq"``: each consumer's weight solves min E‖W y + b − (W' y' + b')‖² (ridge-regularised), with an
     intercept folded into the bias where the consumer has one (FLAP's mean-to-bias is its special case);
     a consumer whose weight is shared (the LM head tied to the embedding) falls back to ``"diag"``.
   - ``"diag"``: the same objective over a per-channel rescaling of the norm's weight only.
   - ``"scale"``: one factor per norm site (the fitted answer to "rescale by sqrt(d/d')?": see ``result.scales``).
   - ``"none"``: plain slicing.

   The fit is per site on the dense model's statistics (not sequential): it is exact in expectation of a
   quadratic loss over the calibration data, never per input, and so never part of the exactness oracle.

Known LLaMA-style families only (``input_layernorm``, ``post_attention_layernorm``, ``self_attn.q/k/v/o_proj``,
``mlp.gate/up/down_proj`` Linear layers, ``model.norm``, ``lm_head``) with a plain RMSNorm (y = g·x/rms(x),
checked on the first batch); others are refused before anything changes.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from sparsify.adapters.activation import calibration_pass
from sparsify.errors import SparsifyError
from sparsify.hf.inputs import check_model, token_batches
from sparsify.hf.pretrained import sync_config

Compensate = Literal["lstsq", "diag", "scale", "none"]
Score = Literal["consumer", "energy"]
_ATTN, _MLP = ("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")


@dataclass(frozen=True)
class Site:
    """One RMSNorm of the residual stream and the Linear layers that read its output."""

    norm: str
    consumers: tuple[str, ...]


@dataclass
class HiddenResult:
    """What ``prune_hidden`` did."""

    kept: np.ndarray  # hidden channel indices kept (sorted)
    removed: np.ndarray
    compensate: str
    scores: np.ndarray  # importance per original hidden channel
    scales: dict[str, float] = field(default_factory=dict)  # norm → fitted factor ("scale") or mean factor
    fallback: dict[str, str] = field(default_factory=dict)  # consumer → why it got the norm-scale fit instead
    sqrt_ratio: float = 1.0  # sqrt(d / d'), for comparison with the fitted scales


def stream_sites(model: nn.Module) -> list[Site]:
    """The residual stream's norm sites of a LLaMA-style ``*ForCausalLM``; raises ``SparsifyError`` otherwise."""
    base = getattr(model, "model", None)
    layers, final = getattr(base, "layers", None), getattr(base, "norm", None)
    if layers is None or final is None or not isinstance(getattr(model, "lm_head", None), nn.Linear):
        raise SparsifyError(f"{type(model).__name__}: hidden-size pruning knows LLaMA-style causal LMs "
                            "(model.model.layers, model.model.norm, lm_head); prune this model's residual group "
                            "with prune_channels(..., allow_inexact=True) instead")
    hidden = final.weight.numel()
    sites = []
    for i, layer in enumerate(layers):
        prefix = f"model.layers.{i}"
        for norm, parent, names in (("input_layernorm", "self_attn", _ATTN), ("post_attention_layernorm", "mlp", _MLP)):
            owner = getattr(layer, parent, None)
            missing = [n for n in names if not isinstance(getattr(owner, n, None), nn.Linear)]
            if not hasattr(layer, norm) or missing:
                raise SparsifyError(f"{prefix} ({type(layer).__name__}) lacks {norm} or {parent}.{missing} as "
                                    "nn.Linear (an MoE or another block layout): hidden-size pruning with "
                                    "compensation covers dense LLaMA-style layers only")
            sites.append(Site(f"{prefix}.{norm}", tuple(f"{prefix}.{parent}.{n}" for n in names)))
        extra = [n for n, m in layer.named_children() if "norm" in n and n not in ("input_layernorm",
                 "post_attention_layernorm") and getattr(getattr(m, "weight", None), "numel", lambda: 0)() == hidden]
        if extra:
            raise SparsifyError(f"{prefix} has further residual norms {extra} (sandwich norms): the stream is "
                                "normalised where this module does not model it; not supported")
    sites.append(Site("model.norm", ("lm_head",)))
    return sites


def _eps(norm: nn.Module) -> float:
    for attr in ("variance_epsilon", "eps"):
        value = getattr(norm, attr, None)
        if isinstance(value, float):
            return value
    raise SparsifyError(f"{type(norm).__name__} has no float `variance_epsilon` or `eps`; not a known RMSNorm")


class _Moments:
    """Per site, sums over tokens for the importance (pass 1) or the compensation fit (pass 2, kept set known)."""

    def __init__(self, model: nn.Module, sites: list[Site], kept: torch.Tensor | None = None) -> None:
        self.model, self.sites, self.kept = model, sites, kept
        self.sums: dict[str, dict[str, torch.Tensor]] = {s.norm: {} for s in sites}
        self.tokens: dict[str, int] = dict.fromkeys((s.norm for s in sites), 0)
        self._stash: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._checked: set[str] = set()

    def hooks(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for s in self.sites:
            out[s.norm] = self._norm_hook(s.norm)
            out[s.consumers[0]] = self._consumer_hook(s.norm)
        return out

    def _norm_hook(self, name: str):
        eps = _eps(self.model.get_submodule(name))

        def hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            x = (args[0] if args else kwargs["hidden_states"]).detach().double()
            x = x.reshape(-1, x.shape[-1])
            ms = x.pow(2).mean(-1, keepdim=True)
            rms = (ms + eps).sqrt()
            r = rms if self.kept is None else rms / (x.index_select(1, self.kept).pow(2).mean(-1, keepdim=True)
                                                     + eps).sqrt()
            self._stash[name] = (x / rms, r if self.kept is not None else torch.ones_like(rms))

        return hook

    def _consumer_hook(self, name: str):
        def hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            y = (args[0] if args else kwargs["input"]).detach()
            y = y.reshape(-1, y.shape[-1]).double()
            xhat, r = self._stash.pop(name)
            if name not in self._checked:
                self._check_plain_rms(name, xhat, y)
            acc = self.sums[name]
            if self.kept is None:
                terms = {"y2": y.pow(2).sum(0), "xhat2": xhat.pow(2).sum(0)}
            else:
                yk = y.index_select(1, self.kept) * r  # what the consumers see after pruning
                terms = {"yy": y.T @ yk, "kk": yk.T @ yk, "y": y.sum(0), "k": yk.sum(0), "r": r.sum()}
            for key, value in terms.items():
                acc[key] = value if key not in acc else acc[key] + value.to(acc[key].device)
            self.tokens[name] += y.shape[0]

        return hook

    def _check_plain_rms(self, name: str, xhat: torch.Tensor, y: torch.Tensor) -> None:
        g = self.model.get_submodule(name).weight.detach().double().to(y.device)
        expected = xhat.to(y.device) * g
        err = (expected - y).abs().max() / expected.abs().max().clamp_min(1e-12)
        if float(err) > 2e-2:
            raise SparsifyError(f"{name} ({type(self.model.get_submodule(name)).__name__}) does not compute "
                                f"weight * x / rms(x) (relative difference {float(err):.2g}); hidden-size "
                                "compensation models a plain RMSNorm only")
        self._checked.add(name)

    def run(self, batches: Iterable[Any]) -> _Moments:
        if calibration_pass(self.model, self.hooks(), batches) == 0:
            raise SparsifyError("prune_hidden/hidden_importance got no calibration batches; pass an iterable of "
                                "model inputs (e.g. dicts with input_ids)")
        missing = [n for n, t in self.tokens.items() if t == 0]
        if missing:
            raise SparsifyError(f"calibration never reached {missing[:3]}; is use_cache / a custom forward skipping "
                                "layers?")
        return self


def _check_score(score: Any) -> None:
    if score not in ("consumer", "energy"):
        raise SparsifyError(f"score must be 'consumer' or 'energy', got {score!r}")


def _kept_count(d: int, fraction: float | None, keep: int | None, multiple_of: int) -> int:
    """How many hidden channels to keep: ``keep``, or ``d`` less ``fraction`` of it, rounded to ``multiple_of``."""
    if isinstance(multiple_of, bool) or not isinstance(multiple_of, int) or multiple_of < 1:
        raise SparsifyError(f"prune_hidden: multiple_of must be an int ≥ 1 (1: no rounding), got {multiple_of!r}")
    if keep is None:
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 <= fraction < 1.0:
            raise SparsifyError(f"prune_hidden: give fraction in [0, 1) or keep; got fraction={fraction!r}")
        keep = d - round(d * fraction)
    elif fraction is not None:
        raise SparsifyError(f"prune_hidden: give fraction or keep, not both (fraction={fraction}, keep={keep})")
    elif isinstance(keep, bool) or not isinstance(keep, int) or not 0 < keep <= d:
        raise SparsifyError(f"prune_hidden: keep must be an int in 1..{d} (hidden_size), got {keep!r}")
    rounded = max(multiple_of, round(keep / multiple_of) * multiple_of)
    if rounded > d:
        raise SparsifyError(f"prune_hidden: {keep} kept channels round to {rounded} (multiple_of={multiple_of}), more "
                            f"than hidden_size={d}; pass a smaller multiple_of")
    return rounded


def hidden_importance(model: nn.Module, batches: Iterable[Any], *, score: Score = "consumer") -> np.ndarray:
    """One value per hidden channel (higher = keep), from one calibration pass; see the module docstring."""
    sites = stream_sites(model)
    _check_score(score)
    stats = _Moments(model, sites).run(token_batches(model, batches, "hidden_importance"))
    total = None
    for s in sites:
        n = stats.tokens[s.norm]
        if score == "energy":
            v = stats.sums[s.norm]["xhat2"] / n / len(sites)
        else:
            cols = sum(model.get_submodule(c).weight.detach().double().pow(2).sum(0) for c in s.consumers)
            v = stats.sums[s.norm]["y2"] / n * cols.to(stats.sums[s.norm]["y2"].device)
        total = v if total is None else total + v.to(total.device)
    return total.cpu().numpy()


_LAYER_TENSORS = {f"self_attn.{p}_proj.{t}" for p in "qkvo" for t in ("weight", "bias")} | {
    f"mlp.{p}_proj.{t}" for p in ("gate", "up", "down") for t in ("weight", "bias")} | {
    "self_attn.q_norm.weight", "self_attn.k_norm.weight", "input_layernorm.weight", "post_attention_layernorm.weight"}


def _sliced(model: nn.Module, sites: list[Site], kept: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every tensor of the residual stream, restricted to the kept channels (name → new value)."""
    unknown = [n for n, _ in model.named_parameters(remove_duplicate=False) if not (
        n in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")
        or (n.startswith("model.layers.") and n.split(".", 3)[3] in _LAYER_TENSORS))]
    if unknown:
        raise SparsifyError(f"{type(model).__name__} has parameters {unknown[:4]} outside the LLaMA-style layout; "
                            "they may carry the residual stream, so hidden-size pruning refuses this model")
    out = {"model.embed_tokens.weight": model.model.embed_tokens.weight.index_select(1, kept)}
    if model.lm_head.weight is not model.model.embed_tokens.weight:
        out["lm_head.weight"] = model.lm_head.weight.index_select(1, kept)
    for s in sites:
        out[f"{s.norm}.weight"] = model.get_submodule(s.norm).weight.index_select(0, kept)
        for c in s.consumers:
            if c != "lm_head":
                out[f"{c}.weight"] = model.get_submodule(c).weight.index_select(1, kept)
    for i, layer in enumerate(model.model.layers):
        for name, writer in ((f"model.layers.{i}.self_attn.o_proj", layer.self_attn.o_proj),
                             (f"model.layers.{i}.mlp.down_proj", layer.mlp.down_proj)):
            out[f"{name}.weight"] = writer.weight.index_select(0, kept)
            if writer.bias is not None:
                out[f"{name}.bias"] = writer.bias.index_select(0, kept)
    return {k: v.detach().clone() for k, v in out.items()}


def _refresh(model: nn.Module, tied: bool) -> None:
    for module in model.modules():
        if isinstance(module, nn.Linear):
            module.in_features, module.out_features = module.weight.shape[1], module.weight.shape[0]
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.model.embed_tokens.embedding_dim = model.model.embed_tokens.weight.shape[1]


def _replace(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Swap in the new tensors and sync the config; all-or-nothing (restored if the config cannot take them)."""
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    old = {n: getattr(model.get_submodule(n.rsplit(".", 1)[0]), n.rsplit(".", 1)[1]) for n in tensors}
    old_config = copy.deepcopy(model.config)
    try:
        for name, value in tensors.items():
            module_name, attr = name.rsplit(".", 1)
            module = model.get_submodule(module_name)
            before = getattr(module, attr)
            setattr(module, attr, nn.Parameter(value.to(before.device, before.dtype), before.requires_grad))
        _refresh(model, tied)
        sync_config(model)
    except Exception:
        for name, value in old.items():
            module_name, attr = name.rsplit(".", 1)
            setattr(model.get_submodule(module_name), attr, value)
        _refresh(model, tied)
        model.config = old_config
        raise


def _solve(c: torch.Tensor, rhs: torch.Tensor, ridge: float) -> torch.Tensor:
    """X with X·(c + λI) = rhs (c symmetric PSD; λ = ridge · mean diagonal)."""
    lam = ridge * float(c.diagonal().mean().clamp_min(1e-12))
    return torch.linalg.solve(c + lam * torch.eye(len(c), dtype=c.dtype, device=c.device), rhs.T).T


def _fit(model: nn.Module, stats: _Moments, sites: list[Site], kept: torch.Tensor, how: Compensate,
         ridge: float, shared: set[str], result: HiddenResult) -> dict[str, torch.Tensor]:
    """New tensors (name → value, in the pruned shapes) for the consumers' weights/biases or the norms' weights."""
    new: dict[str, torch.Tensor] = {}
    for s in sites:
        acc, n = stats.sums[s.norm], stats.tokens[s.norm]
        yy, kk = acc["yy"] / n, acc["kk"] / n  # E[y y'ᵀ] (d × d'), E[y' y'ᵀ] (d' × d')
        result.scales[s.norm] = float(acc["r"] / n)
        norm_fit = []
        for c in s.consumers:
            module = model.get_submodule(c)
            w = module.weight.detach().double().to(yy.device)
            if how == "lstsq" and c not in shared:
                if module.bias is None:
                    new[f"{c}.weight"] = _solve(kk, w @ yy, ridge)
                else:  # augmented input [y'; 1]: the intercept goes into the bias
                    mk, my = acc["k"] / n, acc["y"] / n
                    aug = torch.cat([torch.cat([kk, mk[:, None]], 1), torch.cat([mk, mk.new_ones(1)])[None]], 0)
                    sol = _solve(aug, torch.cat([w @ yy, (w @ my)[:, None]], 1), ridge)
                    new[f"{c}.weight"], new[f"{c}.bias"] = sol[:, :-1], module.bias.detach().double() + sol[:, -1]
            else:
                if how == "lstsq":
                    result.fallback[c] = "its weight is shared (tied LM head): the norm's scale was fitted instead"
                norm_fit.append(w)
        if not norm_fit or how == "none":
            continue
        w = torch.cat(norm_fit, 0)
        wk = w.index_select(1, kept)
        gram, cross = wk.T @ wk, wk.T @ w @ yy  # d' × d'
        if how == "scale":
            factor = torch.trace(cross) / torch.trace(gram @ kk).clamp_min(1e-30)
            result.scales[s.norm] = float(factor)
            scale = factor.expand(len(kept))
        else:  # diag: min over c of E‖W y − W_K diag(c) y'‖²  →  ((W_KᵀW_K) ⊙ E[y'y'ᵀ]) c = diag(W_KᵀW E[y y'ᵀ])
            scale = torch.linalg.solve(gram * kk + ridge * float((gram * kk).diagonal().mean()) *
                                       torch.eye(len(kept), dtype=kk.dtype, device=kk.device),
                                       cross.diagonal())
        g = model.get_submodule(s.norm).weight.detach().double().to(scale.device)
        new[f"{s.norm}.weight"] = g.index_select(0, kept) * scale
    return new


def prune_hidden(model: nn.Module, batches: Iterable[Any], fraction: float | None = None, *,
                 keep: int | None = None, compensate: Compensate = "lstsq", score: Score = "consumer",
                 importance: np.ndarray | None = None, multiple_of: int = 8, ridge: float = 1e-3) -> HiddenResult:
    """Remove ``fraction`` of the hidden channels (or keep ``keep``) of a LLaMA-style causal LM, compensated.

    ``batches``: calibration inputs (a list: it is iterated twice, for the importance and for the fit).
    The kept count is rounded to a multiple of ``multiple_of``. ``importance`` overrides the calibrated
    score. All checks, both passes and the fit run before anything changes; the new tensors and
    ``config.hidden_size`` are then swapped in all-or-nothing. Parameters are new tensors: build
    the optimizer afterwards.
    """
    check_model(model, "prune_hidden")
    sites = stream_sites(model)
    batches = token_batches(model, batches, "prune_hidden")
    d = model.get_submodule(sites[-1].norm).weight.numel()
    if getattr(model.config, "hidden_size", d) != d:
        raise SparsifyError(f"prune_hidden: config.hidden_size is {model.config.hidden_size} but the model's hidden "
                            f"width is {d} (config edited by hand?); run sparsify.hf.sync_config(model) first")
    keep = _kept_count(d, fraction, keep, multiple_of)
    if compensate not in ("lstsq", "diag", "scale", "none"):
        raise SparsifyError(f"compensate must be 'lstsq', 'diag', 'scale' or 'none', got {compensate!r}")
    _check_score(score)
    if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not ridge >= 0:
        raise SparsifyError(f"prune_hidden: ridge must be a number ≥ 0, got {ridge!r}")
    scores = hidden_importance(model, batches, score=score) if importance is None else np.asarray(importance, float)
    if scores.shape != (d,):
        raise SparsifyError(f"importance has shape {scores.shape}; give one value per hidden channel ({d})")
    if not np.isfinite(scores).all():
        raise SparsifyError("importance holds NaN or infinite values; give finite scores (higher = keep)")
    kept_np = np.sort(np.argsort(-scores, kind="stable")[:keep])
    removed = np.setdiff1d(np.arange(d), kept_np)
    result = HiddenResult(kept_np, removed, compensate, scores, sqrt_ratio=float(np.sqrt(d / keep)))
    device = model.get_submodule(sites[-1].norm).weight.device
    kept = torch.as_tensor(kept_np, device=device)
    new: dict[str, torch.Tensor] = {}
    if compensate != "none" and len(removed):
        stats = _Moments(model, sites, kept).run(batches)
        shared = {"lm_head"} if model.lm_head.weight is model.get_input_embeddings().weight else set()
        new = _fit(model, stats, sites, kept, compensate, ridge, shared, result)
    if not len(removed):
        return result
    tensors = _sliced(model, sites, kept)
    tensors.update({k: v for k, v in new.items()})
    _replace(model, tensors)
    return result
