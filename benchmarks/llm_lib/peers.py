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
import io
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


def _import_modelopt() -> Any:
    """``modelopt.torch.prune``, or a RuntimeError naming the module that is missing ("N/A: ...")."""
    try:
        import modelopt.torch.prune as mtp
    except ImportError as error:
        raise RuntimeError(f"N/A: nvidia-modelopt cannot be imported here (missing module {error.name!r}): "
                           "pip install nvidia-modelopt==0.47.0 torchprofile==0.0.4 requests 'pulp<3' (PuLP 4 needs "
                           "orloge and cpsat_logutils too)") from error
    return mtp


def _fastnas_rules(choices: int, divisor: int) -> dict[str, Any]:
    """FastNAS's ``nn.Linear`` rule: widths ``i / choices`` of the dense one, multiples of ``divisor``."""
    if choices < 2 or divisor < 1:
        raise ValueError(f"choices must be >= 2 and divisor >= 1, got {choices} and {divisor}")
    return {"nn.Linear": {"features_ratio": tuple(i / choices for i in range(1, choices + 1)),
                          "feature_divisor": divisor}}


def _modelopt_count(module: nn.Module, ids: torch.Tensor) -> int:
    """Parameters as ModelOpt's constraint counts them (once per module in a forward: a tied LM head counts again)."""
    from modelopt.torch.utils.network import param_num_from_forward

    return round(param_num_from_forward(module, args=ids, unit=1.0))


def _smallest_subnet(model: nn.Module, ids: torch.Tensor, rules: dict[str, Any]) -> tuple[int, dict[str, list[int]]]:
    """The ModelOpt count of FastNAS's smallest subnet of a copy of ``model``, and the widths FastNAS may choose."""
    import modelopt.torch.nas as mtn
    from modelopt.torch.opt.utils import named_hparams
    from modelopt.torch.prune.pruning import PruneModeRegistry

    space = mtn.convert(_Logits(copy.deepcopy(model)), [("fastnas", rules)], registry=PruneModeRegistry)
    searched = {name: sorted(hp.choices) for name, hp in named_hparams(space, configurable=True)}
    mtn.sample(space, min)
    return _modelopt_count(space, ids), searched


def modelopt(model: nn.Module, calibration: Calibration, target: int, *, choices: int = 100,
             divisor: int = 8, score_batches: int = 2) -> dict[str, Any]:
    """Prune ``model`` in place with NVIDIA ModelOpt's FastNAS (``mtp.prune(mode="fastnas")``) to ``target`` parameters.

    FastNAS measures, for every configurable width and each of its choices, how much the score drops
    (the sensitivity map), bisects a threshold on that drop for the best subnet under the ``params``
    upper bound, and exports it (plain sliced ``nn.Linear`` modules). On the HF LLaMA the only
    configurable widths are the MLP neurons (``gate_proj.out_features`` per layer, coupled with
    ``up_proj`` and ``down_proj``): ModelOpt has dynamic modules for ``nn.Linear``/conv/BatchNorm/
    LayerNorm/GroupNorm only (none for ``nn.Embedding``, ``LlamaRMSNorm`` or HF attention; heads are a
    Megatron-only hparam) and its fx tracing fails on the HF attention, so heads, KV groups and the
    hidden size stay. A target below the smallest MLP subnet is checked first and raised as
    "N/A: ...". The score is minus the LM loss on ``score_batches`` calibration batches (FastNAS
    requires a ``score_func``; a ``data_loader`` would only recalibrate BatchNorm). ModelOpt's default
    widths (20 ratios, multiples of 32, smallest 64 of 1408) move the count by 0.5-1 % of the target per
    layer step on the 8-layer model and stopped 2.5 % under the 50 % target of the trained LLaMA;
    ``choices`` ratios at multiples of ``divisor`` meet both targets within 0.2 %. ModelOpt counts
    the tied LM head again beside the embedding: the bound is the target plus that difference
    (absolute: a "75%" string would be relative to ModelOpt's own count), so it lands at or below the
    target as ``budget.count_params`` counts. Caveat, from ModelOpt's map: a layer whose loss does not
    rise by 1e-5 at some width gets sensitivity 0 at every larger width, and FastNAS then cuts it to
    its smallest width at any threshold; on an untrained or barely trained model it lands far below
    the target, and ``target_met`` says so.

    The search is the method, so it is timed. Needs ``nvidia-modelopt==0.47.0`` (a benchmark-only peer, not a
    dependency of sparsify) with ``torchprofile==0.0.4`` beside it. ``import modelopt.torch.prune`` plus this
    FastNAS run import, beyond torch and transformers: scipy, rich, numpy, tqdm, packaging, regex, PyYAML,
    huggingface_hub, setuptools (torch's cpp_extension), requests (urllib3, idna, certifi), pulp (< 3: PuLP 4
    also imports orloge and cpsat_logutils), omegaconf, pydantic (pydantic_core, annotated_types,
    typing_inspection) and torchprofile; nvidia-ml-py, ninja, safetensors and charset_normalizer are not needed
    on this path. Not usable here: ``mcore_minitron`` (imports ``megatron.core`` and Transformer Engine, prunes
    Megatron-Core GPT/Mamba models; HF models reach it only through Megatron-Bridge) and Puzzletron (a hydra
    pipeline of scored, MIP-assembled heterogeneous blocks written as checkpoints; needs hydra-core and the
    ``hf``/``puzzletron`` extras).
    """
    mtp = _import_modelopt()
    import tempfile

    import modelopt as mo
    import torch.nn.functional as F

    rules = _fastnas_rules(choices, divisor)
    ids = calibration.example["input_ids"]
    batches = [b["input_ids"] for b in calibration.batches[:score_batches]]
    if not batches:
        raise ValueError("ModelOpt's FastNAS needs at least one calibration batch for its score")
    with torch.no_grad():
        offset = _modelopt_count(_Logits(model), ids) - count_params(model)["total"]
        smallest, searched = _smallest_subnet(model, ids, rules)
    if smallest - offset > target:
        widths = ", ".join(f"{n.removeprefix('model.model.')} {c[0]}..{c[-1]}" for n, c in searched.items())
        raise RuntimeError(f"N/A: ModelOpt FastNAS cannot reach {target:,} parameters: it searches only {widths} "
                           f"here (attention and hidden size are not configurable), and its smallest subnet has "
                           f"{smallest - offset:,}")

    @torch.no_grad()
    def score(candidate: nn.Module) -> float:
        losses = []
        for batch in batches:
            logits = candidate(batch)[:, :-1].float()
            losses.append(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1)))
        return -float(torch.stack(losses).mean())

    tied = model.lm_head.weight is model.get_input_embeddings().weight
    device = _device(model)
    _sync(device)
    start = time.perf_counter()
    log = io.StringIO()  # ModelOpt prints tables and progress bars: kept out of the benchmark's log
    with tempfile.TemporaryDirectory() as folder, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        pruned, state = mtp.prune(_Logits(model), mode=[("fastnas", rules)],
                                  constraints={"params": float(target + offset)}, dummy_input=ids,
                                  config={"score_func": score, "checkpoint": f"{folder}/search.pth"})
    _sync(device)
    seconds = time.perf_counter() - start
    if pruned.model is not model:
        raise RuntimeError("ModelOpt returned a new model; the benchmark measures the one it pruned in place")
    if tied:
        model.lm_head.weight = model.get_input_embeddings().weight
    widths = [layer.mlp.gate_proj.out_features for layer in model.model.layers]
    model.config.intermediate_size = max(widths)  # FastNAS picks a width per layer; the config holds one
    return {"prune_s": seconds, "modelopt": mo.__version__, "modelopt_widths": widths,
            "modelopt_sensitivity_evals": sum(len(v) for v in state.get("sensitivity_map", {}).values()),
            "modelopt_best": log.getvalue().rpartition("[best_subnet_constraints]")[2].strip()[:200],
            "note": f"ModelOpt {mo.__version__} FastNAS, params upper bound, MLP widths only ({choices} choices, "
                    f"multiples of {divisor}), score = -LM loss on {len(batches)} calibration batches (the search "
                    "is timed: it is the method)"}
