"""Peer pruners on the same Hugging Face decoder: Torch-Pruning (and NVIDIA ModelOpt when installed).

Torch-Pruning (TP) 1.6 as in its ``examples/LLMs/prune_llm.py``: ``MetaPruner`` with a local (per
layer) ratio on the hidden size (embedding, norms, every projection's input/output) and the MLP
neurons, the LM head ignored as a root. Its dependency graph does not finish on the GQA attention
of transformers 5 (the tracing loops in ``get_all_groups``, TP issue #527 reports the same on
Qwen3-8B; with an attention given as a customized layer it fails on the rotary ``cat``), so while
TP traces, each attention runs inside one opaque autograd node and is given to TP as one layer
(``customized_pruners``) whose input and output channels are the hidden size: TP prunes the hidden
size through it (q/k/v columns, o_proj rows) and keeps its heads. The
ratio meeting the parameter target is searched by pruning copies (not timed); the timed run is one
``MetaPruner`` build plus ``step()``. A run longer than ``timeout_s`` is abandoned (SIGALRM).
"""

from __future__ import annotations

import contextlib
import copy
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from benchmarks.llm_lib.budget import count_params, search_ratio
from benchmarks.llm_lib.ours import Calibration, _device, _sync


@contextlib.contextmanager
def deadline(seconds: float | None, what: str) -> Iterator[None]:
    """Raise TimeoutError inside the block after ``seconds`` (main thread only; elsewhere no limit)."""
    if not seconds or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum: int, frame: Any) -> None:
        raise TimeoutError(f"{what} did not finish in {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _attention_pruner() -> Any:
    import torch_pruning as tp

    def cut(linear: nn.Linear, idxs: list[int], dim: int) -> None:
        keep = torch.tensor(sorted(set(range(linear.weight.shape[dim])) - set(int(i) for i in idxs)),
                            device=linear.weight.device)
        linear.weight = nn.Parameter(linear.weight.data.index_select(dim, keep))
        if dim == 0 and linear.bias is not None:
            linear.bias = nn.Parameter(linear.bias.data.index_select(0, keep))
        if dim == 0:
            linear.out_features = len(keep)
        else:
            linear.in_features = len(keep)

    class AttentionAsLayer(tp.pruner.function.BasePruningFunc):
        """A whole attention module as one layer: input = q/k/v columns, output = o_proj rows (hidden size)."""

        TARGET_MODULES = None

        def prune_out_channels(self, layer: nn.Module, idxs: list[int]) -> nn.Module:
            cut(layer.o_proj, idxs, 0)
            return layer

        def prune_in_channels(self, layer: nn.Module, idxs: list[int]) -> nn.Module:
            for name in ("q_proj", "k_proj", "v_proj"):
                cut(getattr(layer, name), idxs, 1)
            return layer

        def get_out_channels(self, layer: nn.Module) -> int:
            return layer.o_proj.out_features

        def get_in_channels(self, layer: nn.Module) -> int:
            return layer.q_proj.in_features

    return AttentionAsLayer()


def _attentions(model: nn.Module) -> list[nn.Module]:
    return [m for name, m in model.named_modules() if name.endswith("self_attn")]


class _Opaque(torch.autograd.Function):
    """Runs a module's forward as one autograd node (tracing only: never differentiated)."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, run: Any) -> torch.Tensor:  # type: ignore[override]
        return run(hidden)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:  # type: ignore[override]
        raise RuntimeError("the opaque attention is for Torch-Pruning's tracing only")


@contextlib.contextmanager
def opaque_attention(model: nn.Module) -> Iterator[None]:
    """While inside, every attention module's output is one autograd node whose input is the hidden state."""
    patched = []
    for attention in _attentions(model):
        original = attention.forward

        def forward(hidden_states: torch.Tensor, *args: Any, _original: Any = original, **kwargs: Any) -> Any:
            out = _Opaque.apply(hidden_states, lambda h: _original(h, *args, **kwargs)[0])
            return out, None

        attention.forward = forward
        patched.append(attention)
    try:
        yield
    finally:
        for attention in patched:
            del attention.forward


def _finish(model: nn.Module, tied: bool) -> None:
    """Re-tie the LM head to the pruned embedding and write the new widths into the config."""
    embed = model.get_input_embeddings()
    if tied:
        model.lm_head.weight = embed.weight
    config = model.config
    config.hidden_size = embed.weight.shape[1]
    mlp = model.model.layers[0].mlp
    config.intermediate_size = mlp.gate_proj.out_features


def _tp_prune(model: nn.Module, calibration: Calibration, ratio: float, criterion: str,
              timings: dict[str, float] | None = None) -> None:
    import torch_pruning as tp

    tied = model.lm_head.weight is model.get_input_embeddings().weight
    if criterion == "taylor":
        importance = tp.importance.GroupTaylorImportance()
        model.zero_grad(set_to_none=True)
        for batch in calibration.labeled:
            model(**batch).loss.backward()
    else:
        importance = tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean")
    head_dim = model.model.layers[0].self_attn.head_dim
    model.config.head_dim = head_dim  # the rotary embedding reads it; hidden_size / heads changes below
    start = time.perf_counter()
    with opaque_attention(model):
        pruner = tp.pruner.MetaPruner(
            model, example_inputs=calibration.example["input_ids"], importance=importance, global_pruning=False,
            pruning_ratio=ratio, ignored_layers=[model.lm_head], round_to=None,
            customized_pruners={type(a): _attention_pruner() for a in _attentions(model)})
    graph_s = time.perf_counter() - start
    pruner.step()
    model.zero_grad(set_to_none=True)
    _finish(model, tied)
    if timings is not None:
        timings.update(graph_s=graph_s, step_s=time.perf_counter() - start - graph_s)


_RATIOS: dict[tuple[int, int], float] = {}  # (params, target) → ratio: the counts do not depend on the criterion


def torch_pruning(model: nn.Module, calibration: Calibration, target: int, criterion: str = "magnitude", *,
                  timeout_s: float | None = 90.0) -> dict[str, Any]:
    """Prune ``model`` in place with Torch-Pruning to about ``target`` parameters."""
    import torch_pruning as tp

    def params_at(ratio: float) -> float:
        trial = copy.deepcopy(model)
        _tp_prune(trial, calibration, ratio, "magnitude")  # counts do not depend on the criterion (local ratio)
        return count_params(trial)["total"]

    key = (count_params(model)["total"], target)
    if key not in _RATIOS:
        with deadline(timeout_s, "Torch-Pruning's ratio search"):
            _RATIOS[key] = search_ratio(params_at, target, high=0.9, iters=10, tolerance=0.004)
    ratio = _RATIOS[key]
    device = _device(model)
    timings: dict[str, float] = {}
    _sync(device)
    start = time.perf_counter()
    with deadline(timeout_s, "Torch-Pruning"):
        _tp_prune(model, calibration, ratio, criterion, timings)
    _sync(device)
    return {"prune_s": time.perf_counter() - start, **timings, "tp_ratio": ratio, "torch_pruning": tp.__version__,
            "note": f"Torch-Pruning {tp.__version__} MetaPruner, {criterion}, local ratio {ratio:.3f} on the "
                    "hidden size and MLP neurons; attention as one opaque layer (heads kept: TP's graph loops on "
                    "GQA)"}


class _Logits(nn.Module):
    """``ids -> logits`` of a causal LM (ModelOpt traces a module of one tensor input)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids).logits


def modelopt(model: nn.Module, calibration: Calibration, target: int) -> dict[str, Any]:
    """NVIDIA ModelOpt's FastNAS pruning (``pip install nvidia-modelopt``) to ``target`` parameters.

    FastNAS searches the widths ModelOpt finds configurable (on the HF LLaMA: the MLP neurons) for the
    subnet of highest score under the parameter constraint; the score is minus the LM loss on the
    calibration batches. ModelOpt counts a tied LM head apart from the embedding, so the constraint
    is the target plus the embedding.
    """
    try:
        import modelopt.torch.prune as mtp
    except ImportError as error:
        raise RuntimeError(f"nvidia-modelopt is not installed here ({error}): pip install nvidia-modelopt") from error
    import tempfile

    import torch.nn.functional as F

    batches = [b["input_ids"] for b in calibration.batches[:2]]

    @torch.no_grad()
    def score(candidate: nn.Module) -> float:
        losses = []
        for ids in batches:
            logits = candidate(ids)[:, :-1].float()
            losses.append(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)))
        return -float(torch.stack(losses).mean())

    tied = model.lm_head.weight is model.get_input_embeddings().weight
    extra = model.get_input_embeddings().weight.numel() if tied else 0
    device = _device(model)
    _sync(device)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        pruned, _ = mtp.prune(_Logits(model), mode="fastnas", constraints={"params": float(target + extra)},
                              dummy_input=calibration.example["input_ids"],
                              config={"data_loader": batches, "score_func": score,
                                      "checkpoint": f"{folder}/search.pth"})
    _sync(device)
    seconds = time.perf_counter() - start
    if pruned.model is not model:
        raise RuntimeError("ModelOpt returned a new model; the benchmark measures the one it pruned in place")
    if tied:
        model.lm_head.weight = model.get_input_embeddings().weight
    model.config.intermediate_size = model.model.layers[0].mlp.gate_proj.out_features
    import modelopt as mo

    return {"prune_s": seconds, "modelopt": mo.__version__,
            "note": f"ModelOpt {mo.__version__} FastNAS, params constraint, score = -LM loss on 2 calibration "
                    "batches (the search is timed: it is the method)"}
