"""Are pruned models really faster? Dense vs pruned inference latency, sparsify against Torch-Pruning (TP).

For each model and MACs-reduction target (dense MACs / pruned MACs):

* ``dense``: the model, deployed (``sparsify.deploy``: BN folded, channels_last).
* ``ours``: one-shot magnitude pruning (``filter_norm`` L1/L2 importance, ``gmp`` policy with
  ``unit="macs"`` and the ``--budget`` allocation, updated to its final sparsity once, then
  ``Sparsifier.prune()``), deployed. With ``unit="macs"`` the GMP sparsity is the exact fraction of
  MACs removed (the policy bisects its budget on ``Sparsifier.macs_model``). ``ours+round`` adds
  ``round_to`` to the GMP budget. ``ours+latency``: the same MACs target with ``budget="latency"``
  (``sparsify.policies.allocation.latency_budget``: ``round_to`` channels at a time, where a
  ``sparsify.measure.latency_model.LatencyModel`` timed on ``--device`` at the benchmark's batch and dtype says they
  save the most time per MAC); its timed layer configurations are shared between the model's targets.
* ``tp``: Torch-Pruning's ``MetaPruner`` with ``GroupMagnitudeImportance`` (same p) and a uniform
  ``pruning_ratio``: its iterative steps find the step that reaches the same MACs target, then a
  bisection on the ratio refines it; ``tp+round`` passes TP's ``round_to``.
  Final classifier ignored. Deployed the same way (BN folded) for fairness.

Latency: median over ``--iters`` forward passes after ``--warmup`` (CUDA events on GPUs with bf16
autocast, channels_last inputs and cudnn.benchmark; ``time.perf_counter`` on the CPU), batch
``--batch`` for CNNs and ``--vit-batch`` for ViT. ``realised`` = speedup / MACs reduction (1.0: the
latency drops as much as the MACs). MACs come from ``sparsify.graph.cost.module_macs`` (conv/linear
layers and scaled_dot_product_attention products) plus, for ``nn.MultiheadAttention`` (a leaf it does not
trace into), its projections and attention products. Weights are random (latency does not depend on
their values). Every model, dense included, is deployed the same way (``sparsify.deploy``: BN folded,
conv+ReLU fused for eager CUDA unless ``--no-fuse``; ``--s2d-stem``, ``--cast-params``, ``--compile`` as
given); ``--profile`` adds each model's GPU time by kernel kind to the JSON.

ViT-B/16 (``--vit``): only the MLP hidden layers are pruned on both sides (nn.MultiheadAttention is a
leaf whose inner width is tied to embed_dim, the residual width is inexact under LayerNorm; TP is
restricted to the same layers). ``--vit-heads`` adds ``ours+latency+heads``: the attention swapped for
``ExplicitMultiheadAttention`` first, so whole heads are prunable too.

    python -m benchmarks.speed --out /tmp/speed.json                       # GPU defaults
    python -m benchmarks.speed --device cpu --models resnet18 --batch 2 --size 64 --iters 3   # smoke test
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sparsify._compat import import_torchvision  # before torch_pruning: it imports torchvision

tv = import_torchvision()

import torch_pruning as tp  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from sparsify import FilterNormConfig, GMPConfig, Sparsifier, SparsifierConfig  # noqa: E402
from sparsify.deploy import deploy  # noqa: E402
from sparsify.graph.cost import is_weight_key, module_macs, product_weight  # noqa: E402
from sparsify.graph.trace import trace  # noqa: E402
from sparsify.measure import autocast_context, measure_latency, width_latency_table  # noqa: E402
from sparsify.measure.breakdown import time_by_kind  # noqa: E402
from sparsify.measure.latency_model import LatencyModel  # noqa: E402
from sparsify.nn import ExplicitMultiheadAttention, explicit_multihead_attention_  # noqa: E402

DEFAULT_RATIOS = {"resnet50": [2.0, 4.0], "mobilenet_v2": [2.0, 4.0], "resnet18": [2.0], "vit_b_16": [1.5]}


# ----------------------------------------------------------------------------------------------- models
def build(name: str, size: int) -> nn.Module:
    torch.manual_seed(0)
    if name.startswith("vit"):
        return getattr(tv.models, name)(weights=None, image_size=size).eval()
    return getattr(tv.models, name)(weights=None).eval()


def tp_ignored(name: str, model: nn.Module) -> list[nn.Module]:
    """TP's ignored layers: the classifier; for ViT everything but the MLP hidden layers (like ours)."""
    if name.startswith("vit"):
        keep = {layer.mlp[0] for layer in model.encoder.layers}
        return [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear, nn.MultiheadAttention))
                and m not in keep]
    return [[m for m in model.modules() if isinstance(m, nn.Linear)][-1]]


def macs(model: nn.Module, x: torch.Tensor) -> float:
    """MACs per example: conv/linear layers (sparsify.graph.cost) + nn.MultiheadAttention."""
    return float(sum(module_macs(trace(model, x)).values())) + attention_macs(model, x)


def attention_macs(model: nn.Module, x: torch.Tensor) -> float:
    """Per example: in/out projections and the two attention products of every nn.MultiheadAttention (a
    leaf that ``module_macs`` does not trace into). ExplicitMultiheadAttention needs nothing here: its
    projections and its scaled_dot_product_attention products are counted by ``module_macs``."""
    total = 0.0

    def hook(m: nn.Module, args: tuple[Any, ...], _out: Any) -> None:
        nonlocal total
        q = args[0]
        if q.ndim == 2:  # unbatched (L, E)
            tokens, batch = q.shape[0], 1
        else:
            tokens, batch = (q.shape[1], q.shape[0]) if m.batch_first else (q.shape[0], q.shape[1])
        e = m.embed_dim
        total += batch * (tokens * e * 3 * e + tokens * e * e + 2 * tokens * tokens * e)

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.MultiheadAttention)]
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        for h in handles:
            h.remove()
    return total / x.shape[0]


# ----------------------------------------------------------------------------------------------- pruning
class WeightMacs:
    """Fast MACs of a pruned copy of ``dense``: a conv/linear layer's MACs scale with its weight's size
    (pruning never changes spatial sizes or token counts), an attention product keyed by a projection
    (``f"{weight}@out"``) with that weight's output rows, other attention products and nn.MultiheadAttention
    (not pruned here) are fixed."""

    def __init__(self, dense: nn.Module, x: torch.Tensor) -> None:
        self.macs = module_macs(trace(dense, x))
        self.size = {k: self._size(dense, k) for k in self.macs}
        self.extra = attention_macs(dense, x)
        self.layers = float(sum(self.macs.values()))
        self.total = self.layers + self.extra

    @staticmethod
    def _size(model: nn.Module, key: str) -> int:
        """What a ``module_macs`` entry scales with: its weight's numel, its projection's output rows, or 1."""
        if is_weight_key(key):
            return model.get_parameter(key).numel()
        weight = product_weight(key)
        return model.get_parameter(weight).shape[0] if weight else 1

    def reduction(self, model: nn.Module) -> float:
        after = sum(m * self._size(model, k) / self.size[k] for k, m in self.macs.items())
        return self.total / (after + self.extra)

    def layer_fraction(self, ratio: float) -> float:
        """Fraction of the conv/linear MACs to remove so that the whole network has ``ratio``× fewer MACs."""
        return 1.0 - (self.total / ratio - self.extra) / self.layers


def prune_ours(dense: nn.Module, x: torch.Tensor, ratio: float, round_to: int | None, p: int, budget: str
               ) -> tuple[nn.Module, dict[str, Any]]:
    """GMP with ``unit="macs"`` (exact MACs, the policy bisects its budget), one update, prune."""
    fraction = WeightMacs(dense, x).layer_fraction(ratio)
    model = copy.deepcopy(dense)
    policy = GMPConfig(sparsity=fraction, unit="macs", budget=budget, start_step=0, end_step=1, update_every=1)
    sp = Sparsifier(model, x, config=SparsifierConfig(adapter=FilterNormConfig(p=p), policy=policy, round_to=round_to))
    sp.step()  # end_step=1: the final sparsity, once
    sp.prune()
    return model, {"gmp_sparsity": round(fraction, 5)}


def latency_arm(weight: float) -> str:
    """The arm's name: ``ours+latency`` at the default importance weight 1, else with the weight."""
    return "ours+latency" if weight == 1.0 else f"ours+latency(w={weight:g})"


def prune_latency(dense: nn.Module, x: torch.Tensor, ratio: float, round_to: int, batch: int,
                  args: argparse.Namespace, cache: dict, weight: float = 1.0,
                  heads: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    """GMP with ``budget="latency"`` at the same exact MACs target: a LatencyModel of the layers timed on
    ``args.device`` (batch, dtype, channels_last as the benchmark), ``round_to`` channels a chunk. With
    ``heads`` (ViT), every nn.MultiheadAttention is first swapped for ExplicitMultiheadAttention, so whole
    heads compete with MLP neurons (the LatencyModel times the projections, not the attention kernel; the
    attention products are in the MACs target and shrink with the heads). ``args.max_group_sparsity`` caps
    the fraction of any group's structures removed (0.5: every layer keeps at least half its heads)."""
    model = copy.deepcopy(dense)
    if heads:
        explicit_multihead_attention_(model)
    fraction = WeightMacs(model, x).layer_fraction(ratio)
    cap = getattr(args, "max_group_sparsity", 1.0)
    policy = GMPConfig(sparsity=fraction, unit="macs", budget="latency", start_step=0, end_step=1, update_every=1,
                       latency_importance_weight=weight, max_group_sparsity=cap)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[args.dtype]
    timing: dict[str, float] = {}

    def latency_model(graph: Any) -> LatencyModel:
        start = time.perf_counter()
        lat = LatencyModel(graph, batch=batch, device=args.device, dtype=dtype, step=round_to,
                           grid_points=args.latency_points, iters=min(10, args.iters), warmup=min(3, args.warmup),
                           cache=cache)
        timing["s"] = time.perf_counter() - start
        return lat

    sp = Sparsifier(model, x, config=SparsifierConfig(adapter=FilterNormConfig(p=args.p), policy=policy,
                                                      round_to=round_to), latency_model=latency_model)
    lat, timing_s = sp.policy.context.latency_model, timing["s"]
    sp.step()
    keep = sp.policy.keep_vectors()
    estimate = lat.reduction(keep)
    sp.prune()
    kept_heads = [m.num_heads for m in model.modules() if isinstance(m, ExplicitMultiheadAttention)]
    return model, {"gmp_sparsity": round(fraction, 5), "max_group_sparsity": cap,
                   "latency_configs_timed": lat.measured, **({"heads_per_layer": kept_heads} if heads else {}),
                   "latency_cache": len(cache), "latency_timing_s": round(timing_s, 2),
                   "latency_model_dense_ms": round(lat.total, 3), "latency_model_pruned_ms": round(lat.after(keep), 3),
                   "estimated_layer_speedup": round(estimate, 3)}


def prune_tp(name: str, dense: nn.Module, x: torch.Tensor, ratio: float, round_to: int | None, p: int,
             steps: int, refine: int) -> tuple[nn.Module, dict[str, Any]]:
    """TP's iterative pruning (``steps`` steps up to ratio 0.95) until the MACs target is met, then
    ``refine`` bisection steps on ``pruning_ratio`` between the last two step ratios (one-shot each)."""
    counter = WeightMacs(dense, x)
    top = 0.95

    def pruner(r: float, iterative: int) -> tuple[nn.Module, Any]:
        model = copy.deepcopy(dense)
        return model, tp.pruner.MetaPruner(
            model, x, importance=tp.importance.GroupMagnitudeImportance(p=p), pruning_ratio=r,
            iterative_steps=iterative, ignored_layers=tp_ignored(name, model), round_to=round_to,
            in_channel_groups={}, out_channel_groups={}, num_heads={})

    model, pr = pruner(top, steps)
    lo = hi = top
    for k in range(1, steps + 1):
        pr.step()
        if counter.reduction(model) >= ratio:
            lo, hi = top * (k - 1) / steps, top * k / steps
            break
    for _ in range(refine if lo < hi else 0):  # TP's widths with round_to are not monotone in the ratio
        mid = 0.5 * (lo + hi)
        candidate, pr = pruner(mid, 1)
        pr.step()
        if counter.reduction(candidate) >= ratio:
            hi, model = mid, candidate
        else:
            lo = mid
    return model.eval(), {"tp_pruning_ratio": round(hi, 5)}


# ----------------------------------------------------------------------------------------------- timing
@dataclass
class Row:
    model: str
    target: float | None
    arm: str
    round_to: int | None = None
    macs_g: float | None = None
    reduction: float | None = None
    ms: float | None = None
    speedup: float | None = None
    realised: float | None = None
    params_m: float | None = None
    prune_s: float | None = None
    info: dict[str, Any] = field(default_factory=dict)
    error: str = ""


def latency_ms(model: nn.Module, example: torch.Tensor, batch: int, args: argparse.Namespace,
               info: dict[str, Any] | None = None) -> float:
    """Median ms of the deployed model (BN folded, channels_last; ``--cast-params``, ``--compile`` as set);
    with ``--profile`` also its device time by kernel kind into ``info``."""
    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[args.dtype]
    model = deploy(model.to(device), example.to(device), channels_last=True, compile=args.compile,
                   dtype=dtype if args.cast_params else None, space_to_depth_stem=args.s2d_stem,
                   fuse_activations=not args.no_fuse)
    x = torch.randn(batch, *example.shape[1:], device=device).contiguous(memory_format=torch.channels_last)
    if args.cast_params and dtype is not None:
        x = x.to(dtype)

    def run() -> None:
        with torch.no_grad(), autocast_context(device, dtype):
            model(x)

    # compiling happens in the first calls: give them their own warm-up
    times = measure_latency(run, iters=args.iters, warmup=args.warmup + (3 if args.compile else 0), device=device)
    if args.profile and info is not None:
        kinds, top = time_by_kind(run, device=device, iters=5, warmup=1)
        info["device_ms_by_kind"] = {k: round(v, 3) for k, v in kinds.items()}
        info["top_kernels"] = [{**t, "ms": round(t["ms"], 3)} for t in top]
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return statistics.median(times)


def bench_model(name: str, args: argparse.Namespace, round_to: int, rows: list[Row], console: Console) -> None:
    vit = name.startswith("vit")
    batch = args.vit_batch if vit else args.batch
    dense = build(name, args.size)
    x = torch.randn(1, 3, args.size, args.size)
    dense_macs = macs(dense, x)
    dense_info = {"widths_not_multiple_of_8": unaligned(dense)}
    dense_ms = latency_ms(copy.deepcopy(dense), x, batch, args, dense_info)
    rows.append(Row(name, None, "dense", None, dense_macs / 1e9, 1.0, dense_ms, 1.0, 1.0,
                    sum(p.numel() for p in dense.parameters()) / 1e6, info=dense_info))
    console.log(f"{name}: dense {dense_ms:.2f} ms, {dense_macs / 1e9:.3f} GMACs")
    arms: list[tuple[str, int | None]] = [("ours", None), ("ours+round", round_to)]
    arms += [(latency_arm(w), round_to) for w in args.latency_weights]
    if vit and args.vit_heads:
        arms.append(("ours+latency+heads", round_to))
    latency_cache: dict = {}  # layer configurations timed for this model, shared between its targets
    if not args.no_tp:
        arms += [("tp", None), ("tp+round", round_to)]
    if args.arms:
        arms = [a for a in arms if a[0] in args.arms]
    for ratio in args.ratios or DEFAULT_RATIOS.get(name, [2.0]):
        for arm, rt in arms:
            row = Row(name, ratio, arm, rt)
            try:
                start = time.perf_counter()
                if arm == "ours+latency+heads":
                    model, row.info = prune_latency(dense, x, ratio, rt, batch, args, {}, heads=True)
                elif arm.startswith("ours+latency"):
                    weight = next(w for w in args.latency_weights if latency_arm(w) == arm)
                    model, row.info = prune_latency(dense, x, ratio, rt, batch, args, latency_cache, weight)
                elif arm.startswith("ours"):
                    model, row.info = prune_ours(dense, x, ratio, rt, args.p, args.budget)
                else:
                    model, row.info = prune_tp(name, dense, x, ratio, rt, args.p, args.tp_steps, args.refine)
                row.prune_s = time.perf_counter() - start
                m = macs(model, x)
                row.macs_g, row.reduction = m / 1e9, dense_macs / m
                row.params_m = sum(p.numel() for p in model.parameters()) / 1e6
                row.info["widths_not_multiple_of_8"] = unaligned(model)
                row.ms = latency_ms(model, x, batch, args, row.info)
                row.speedup = dense_ms / row.ms
                row.realised = row.speedup / row.reduction
                console.log(f"{name} {ratio}× {arm}: {row.ms:.2f} ms, MACs {row.reduction:.2f}×, "
                            f"speedup {row.speedup:.2f}×, realised {row.realised:.2f}")
            except Exception as exc:  # one failing arm is reported, the others still run
                row.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
                console.log(f"{name} {ratio}× {arm}: FAILED {row.error}")
            rows.append(row)


def unaligned(model: nn.Module, multiple: int = 8) -> int:
    """Conv/linear layers whose output width is not a multiple of ``multiple``."""
    return sum((m.out_channels if isinstance(m, nn.modules.conv._ConvNd) else m.out_features) % multiple != 0
               for m in model.modules() if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)))


def _fmt(v: float | None, spec: str) -> str:
    return "" if v is None else format(v, spec)


def table(rows: list[Row], title: str) -> Table:
    t = Table(title=title)
    for col in ("model", "target", "arm", "round_to", "GMACs", "MACs ↓", "ms", "speedup", "realised", "params M",
                "odd widths"):
        t.add_column(col, justify="left" if col in ("model", "arm") else "right")
    for r in rows:
        if r.error:
            t.add_row(r.model, _fmt(r.target, ".1f"), r.arm, str(r.round_to or ""), f"[red]{r.error[:60]}", *[""] * 6)
            continue
        t.add_row(r.model, _fmt(r.target, ".1f") + ("×" if r.target else ""), r.arm, str(r.round_to or ""),
                  _fmt(r.macs_g, ".3f"), _fmt(r.reduction, ".2f") + "×", _fmt(r.ms, ".2f"),
                  _fmt(r.speedup, ".2f") + "×", _fmt(r.realised, ".2f"), _fmt(r.params_m, ".2f"),
                  str(r.info.get("widths_not_multiple_of_8", "")))
    return t


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--models", nargs="+", default=["resnet50", "mobilenet_v2"])
    ap.add_argument("--vit", action="store_true", help="also ViT-B/16 (MLP hidden layers only; 1.5× fewer MACs)")
    ap.add_argument("--ratios", nargs="+", type=float, help="MACs reduction targets (default: per model)")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--vit-batch", type=int, default=64)
    ap.add_argument("--vit-heads", action="store_true",
                    help="ViT: also an ours+latency+heads arm (attention heads and MLP neurons under the latency "
                         "budget, after swapping nn.MultiheadAttention for an explicit module)")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=None, help="default: min(10, iters)")
    ap.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None,
                    help="autocast dtype (default bf16 on CUDA, fp32 on CPU)")
    ap.add_argument("--round-to", default="auto",
                    help="round_to of the +round arms: an int, or 'auto' (CUDA: the width_latency_table suggestion; "
                         "CPU: 8)")
    ap.add_argument("--budget", choices=["uniform", "global", "erk"], default="uniform", help="GMP budget (ours)")
    ap.add_argument("--p", type=int, choices=[1, 2], default=2, help="Lp norm of the magnitude importance")
    ap.add_argument("--latency-points", type=int, default=4,
                    help="ours+latency: widths timed per prunable axis of each layer (LatencyModel grid_points; "
                         "ResNet-50: 322 configurations at 4, 514 at 5)")
    ap.add_argument("--latency-weights", nargs="+", type=float, default=[1.0],
                    help="ours+latency arms, one per latency_importance_weight (0: pure latency; 1: default)")
    ap.add_argument("--max-group-sparsity", type=float, default=1.0,
                    help="ours+latency arms: largest fraction of one group's structures removed (GMPConfig."
                         "max_group_sparsity; 0.5 keeps at least half of every layer's heads/channels)")
    ap.add_argument("--no-tp", action="store_true", help="skip the Torch-Pruning arms")
    ap.add_argument("--arms", nargs="+", help="run only these arms (e.g. ours+round ours+latency); dense always runs")
    ap.add_argument("--tp-steps", type=int, default=20, help="TP iterative steps (ratio 0 → 0.95) to find the target")
    ap.add_argument("--refine", type=int, default=5, help="TP bisection steps after the iterative search")
    ap.add_argument("--no-cudnn-benchmark", action="store_true")
    ap.add_argument("--compile", action="store_true",
                    help="deploy every model (dense too) with torch.compile (element-wise ops fused; slow to start)")
    ap.add_argument("--cast-params", action="store_true",
                    help="deploy with parameters cast to --dtype (no per-call weight casts under autocast)")
    ap.add_argument("--no-fuse", action="store_true",
                    help="deploy without fusing conv+bias+ReLU (and +add) into cuDNN's fused kernels (eager CUDA)")
    ap.add_argument("--s2d-stem", action="store_true",
                    help="deploy every model with its stride-2 stem conv as space-to-depth (sparsify.deploy.stem)")
    ap.add_argument("--profile", action="store_true",
                    help="also record each model's device time by kernel kind (sparsify.measure.breakdown) in the JSON")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    args.warmup = min(10, args.iters) if args.warmup is None else args.warmup
    args.dtype = args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not args.no_cudnn_benchmark
    console = Console()
    started = time.perf_counter()

    widths: list[dict[str, Any]] = []
    if args.round_to == "auto" and device.type == "cuda":
        try:
            for op in ("conv1x1", "conv3x3"):
                wt = width_latency_table(op, range(64, 257, 4), batch=args.batch, size=14, device=device, iters=10,
                                         warmup=3)
                console.print(wt.table())
                widths.append(wt.to_dict())
            round_to = max(w["suggested"] for w in widths)
        except Exception as exc:  # the tables are a convenience: fall back rather than lose the run
            console.log(f"width_latency_table failed ({type(exc).__name__}: {exc}); using round_to=8")
            round_to = 1
        if round_to == 1:
            console.log("no rounding suggested; the +round arms use 8 to show its effect")
            round_to = 8
    else:
        round_to = 8 if args.round_to == "auto" else int(args.round_to)

    rows: list[Row] = []
    for name in args.models + (["vit_b_16"] if args.vit and "vit_b_16" not in args.models else []):
        bench_model(name, args, round_to, rows, console)

    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    deployed = "".join([", compiled" if args.compile else "", ", params cast" if args.cast_params else "",
                        ", s2d stem" if args.s2d_stem else "", ", unfused" if args.no_fuse else ""])
    title = (f"{device_name}, torch {torch.__version__}, {args.dtype}, channels_last{deployed}, batch {args.batch} "
             f"(ViT {args.vit_batch}), {args.size}px, median of {args.iters}")
    console.print(table(rows, title))
    result = {
        "device": device_name, "torch": torch.__version__, "torchvision": tv.__version__,
        "torch_pruning": getattr(tp, "__version__", "?"), "settings": {**vars(args), "out": str(args.out),
                                                                       "round_to_used": round_to},
        "width_tables": widths, "rows": [asdict(r) for r in rows], "seconds": time.perf_counter() - started,
    }
    console.log(f"total {result['seconds']:.0f} s")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1, default=str))
    return result


if __name__ == "__main__":
    main()
