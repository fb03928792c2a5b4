"""Estimated latency of a network after removing structures, from timings of its layers alone.

``LatencyModel`` is to latency what :class:`sparsify.graph.cost.MacsModel` is to MACs: given a plan
``keep`` (group id → boolean keep vector), ``after(keep)`` estimates the network's latency in ms
without touching the model. Every conv (plain, grouped, depthwise) and linear layer of the trace gets
a latency function of its kept input and output widths, measured by timing a fresh layer of the same
type, kernel, stride, padding, dilation and groups on the layer's real input size (``batch`` examples,
autocast ``dtype``, channels_last convs, on ``device``) on a grid of widths: multiples of ``step``
from ``step`` to the full width (``grid_points`` of them, evenly spread, per prunable dim; every
multiple with ``grid_points=None``), linearly (bilinearly) interpolated in between and clamped at the
ends. A depthwise conv has one axis (in = out = groups); a grouped conv too (whole conv groups go).
Identical configurations are timed once (``cache``, shareable between models): ResNet-50 has few
distinct layer shapes. 2-d max/avg pools are modelled as layers whose width follows the conv before them
(:mod:`sparsify.measure.pooling`); other ops (norms, activations, additions) are not modelled: deployment
folds norms and fuses ReLUs and residual adds into the convs (:mod:`sparsify.measure.epilogue`).

    lat = LatencyModel(sp.graph, batch=256, device="cuda", dtype=torch.bfloat16, step=8)
    lat.total, lat.after(keep), lat.measured   # dense estimate, estimate of a plan, configurations timed

``latency_fn(layer_spec, in_w, out_w) -> ms`` replaces the timing (deterministic tests, or an
analytic model); it is called at the grid points only, once per distinct configuration.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import asdict
from typing import Any

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from sparsify.graph.channel_graph import ChannelGraph
from sparsify.graph.cost import module_macs
from sparsify.graph.trace import TensorInfo
from sparsify.measure.epilogue import Epilogue, deployed_epilogues
from sparsify.measure.layer_cache import LayerTimingCache
from sparsify.measure.layer_timing import LayerSpec, time_layer
from sparsify.measure.network import network_latency
from sparsify.measure.pooling import pool_spec
from sparsify.measure.progress import progress

__all__ = ["LatencyModel", "LayerSpec", "time_layer"]  # LayerSpec, time_layer: from measure.layer_timing

LatencyFn = Callable[["LayerSpec", int, int], float]


def _grid(full: int, unit: int, points: int | None) -> np.ndarray:
    """Widths to time along one axis: multiples of ``unit`` up to ``full``, and ``full`` (``points`` of them)."""
    widths = sorted({*range(unit, full + 1, unit), full})
    if points is not None and len(widths) > points:
        widths = [widths[i] for i in sorted({round(j) for j in np.linspace(0, len(widths) - 1, points)})]
    return np.asarray(widths, dtype=np.int64)


class LatencyModel:
    """Estimated ms of the network's conv/linear layers once chosen structures are removed.

    Args:
        cg: the channel graph (``Sparsifier.graph``).
        batch: examples per timed call (default: the traced batch).
        device, dtype, channels_last: where and how layers are timed (``dtype``: autocast; default
            bfloat16 on CUDA, none elsewhere).
        step: grid unit in channels (the widths the budget produces: multiples of ``step``).
        grid_points: widths timed per prunable axis (None: every multiple of ``step``).
        iters, warmup: timing repetitions (median of ``iters``).
        latency_fn: ``fn(spec, in_w, out_w) -> ms`` instead of timing.
        cache: configurations already timed → ms (share it between models; keys include batch, device,
            dtype, channels_last and ``latency_fn``).
        measure: ``fn(pruned_model) -> ms``, the whole network's measured latency as the user runs it (a
            pruned deep copy is passed; deploy it, compile it, time it). Default: :meth:`network_ms` times it
            eagerly (:func:`sparsify.measure.network.network_latency`: eval, channels_last, autocast
            ``dtype``, the traced inputs repeated to ``batch``). Used by latency targets
            (``GMPConfig(budget="latency", target_speedup=...)``).
        network_bench: :func:`sparsify.measure.bench.benchmark` options for the default whole-network timing.
        in_context: time each conv as deployed (:mod:`sparsify.measure.layer_timing`: the bias a folded BN
            gives it, its ReLU fused on CUDA); False: the layer alone.
        cast_params: time with weights already in ``dtype`` (a ``deploy(..., dtype=...)`` model) instead of
            autocast casting them at every call.
        disk_cache: keep real timings in a JSON file per card, software versions and setting
            (:mod:`sparsify.measure.layer_cache`): True, False, or a file path; None (default): on for
            CUDA timings, off elsewhere and with ``latency_fn``. ``disk_cache_path`` is the file used.
        pools: also model 2-d max/avg pools, whose width follows the layer before them
            (:mod:`sparsify.measure.pooling`; ResNet's stem max pool is ~12 % of its time on an H200).
    """

    def __init__(self, cg: ChannelGraph, *, batch: int | None = None, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None, channels_last: bool = True, step: int = 8,
                 grid_points: int | None = 5, iters: int = 10, warmup: int = 3, latency_fn: LatencyFn | None = None,
                 cache: dict[tuple, float] | None = None, measure: Callable[[nn.Module], float] | None = None,
                 network_bench: Mapping[str, Any] | None = None, in_context: bool = True,
                 cast_params: bool = False, disk_cache: bool | str | os.PathLike | None = None,
                 pools: bool = True) -> None:
        if int(step) != step or step < 1:
            raise ValueError(f"step must be a positive integer (e.g. 8), got {step!r}")
        if grid_points is not None and grid_points < 2:
            raise ValueError(f"grid_points must be ≥ 2 (or None for every multiple of step), got {grid_points!r}")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = torch.bfloat16 if dtype is None and self.device.type == "cuda" else dtype
        self.step, self.grid_points = int(step), grid_points
        self.cache: dict[tuple, float] = {} if cache is None else cache
        self.graph, self.measure, self.channels_last = cg, measure, channels_last
        self.network_bench = dict(network_bench or {})
        self.network_timings: list[dict[str, Any]] = []  # every default whole-network timing, as plain data
        self.skipped: dict[str, str] = {}
        self.pools = pools
        self.layers = self._collect(cg)
        self.batch = int(batch if batch is not None else self._traced_batch(cg))
        self._setting = (self.batch, str(self.device), str(self.dtype), channels_last, latency_fn, in_context,
                         cast_params)
        measure = latency_fn or (lambda spec, i, o: time_layer(
            spec, i, o, batch=self.batch, device=self.device, dtype=self.dtype, channels_last=channels_last,
            iters=iters, warmup=warmup, in_context=in_context, cast_params=cast_params))
        self._disk = self._disk_cache(disk_cache, latency_fn is not None, dict(
            dtype=str(self.dtype), batch=self.batch, channels_last=channels_last, in_context=in_context,
            cast_params=cast_params, iters=iters, context=2))  # 2: adds fused, biases merged, grouped unfused
        self.disk_cache_path = None if self._disk is None else str(self._disk.path)
        # per layer and sliced weight dim (0 = out, 1 = in): (group id, structure_of)
        prunable = {g.id for g in cg.prunable_groups()}
        self._dims: list[dict[int, tuple[int, np.ndarray]]] = []
        for spec in self.layers:
            dims: dict[int, tuple[int, np.ndarray]] = {}
            for g in cg.groups:
                for m in g.members:
                    if m.tensor == spec.name and m.role in ("out", "in") and m.dim in (0, 1) and m.dim not in dims:
                        dims[m.dim] = (g.id, np.asarray(m.structure_of))
            if spec.follows is not None:  # a pool: its width is its producer's output width
                producer = next(d for s, d in zip(self.layers, self._dims, strict=False) if s.name == spec.follows)
                dims = {0: producer[0]} if 0 in producer else {}
            self._dims.append(dims)
        self.layers_of: dict[int, list[int]] = {}  # group id → layers whose widths it changes
        for i, dims in enumerate(self._dims):
            for gid, _ in dims.values():
                self.layers_of.setdefault(gid, []).append(i)
        self.measured = 0  # configurations timed (or asked of latency_fn) by this model
        layers = list(zip(self.layers, self._dims, strict=True))
        shown = layers if latency_fn is not None else progress(layers, "timing layers for the latency model")
        self._tables = [self._table(spec, dims, prunable, measure) for spec, dims in shown]
        if self._disk is not None:
            self._disk.save()
        self._memo: dict[tuple[int, int, int], float] = {}
        self.total = float(sum(self.layer_ms(i, s.in_channels, s.out_channels) for i, s in enumerate(self.layers)))

    # ----- building
    def _disk_cache(self, choice: bool | str | os.PathLike | None, fake: bool, setting: dict[str, Any]
                    ) -> LayerTimingCache | None:
        if choice is None:
            choice = self.device.type == "cuda" and not fake
        if choice is False or (fake and choice is True):
            return None
        return LayerTimingCache(self.device, setting, None if choice is True else choice)

    @staticmethod
    def _traced_batch(cg: ChannelGraph) -> int:
        for x in cg.traced.inputs:
            if isinstance(x, torch.Tensor) and x.ndim:
                return int(x.shape[0])
        return 1

    def _collect(self, cg: ChannelGraph) -> list[LayerSpec]:
        traced, gm = cg.traced, cg.traced.graph_module
        macs = module_macs(traced)
        layers: list[LayerSpec] = []
        epilogues = deployed_epilogues(traced)


        layer_of: dict[fx.Node, str] = {}  # modelled conv/linear nodes → their spec's name (pools follow them)
        for node in gm.graph.nodes:
            x = traced.values.get(node.args[0].name) if node.args and isinstance(node.args[0], fx.Node) else None
            count = len(layers)
            pool = pool_spec(gm, node, x, layer_of) if self.pools else None
            if pool is not None:
                layers.append(pool)
                continue
            if node.op == "call_module":
                m = gm.get_submodule(str(node.target))
                key = f"{node.target}.weight"
                if isinstance(m, nn.modules.conv._ConvNd):
                    if m.transposed or not isinstance(x, TensorInfo):
                        self.skipped[key] = "transposed convolution: not modelled" if m.transposed else "no input shape"
                        continue
                    layers.append(LayerSpec(key, "conv", m.in_channels, m.out_channels, tuple(x.shape[1:]),
                                            tuple(m.kernel_size), tuple(m.stride), m.padding, tuple(m.dilation),
                                            m.groups, m.bias is not None, m.padding_mode, float(macs.get(key, 0)),
                                            **asdict(epilogues.get(node, Epilogue()))))
                elif isinstance(m, nn.Linear):
                    if not isinstance(x, TensorInfo):
                        self.skipped[key] = "no input shape"
                        continue
                    layers.append(LayerSpec(key, "linear", m.in_features, m.out_features, tuple(x.shape[1:]),
                                            bias=m.bias is not None, macs=float(macs.get(key, 0))))
            elif node.op == "call_function" and isinstance(x, TensorInfo):
                spec = self._functional(node, x, traced.values, macs)
                if spec is not None:
                    layers.append(spec)
            if len(layers) > count:
                layer_of[node] = layers[-1].name
        return layers

    def _functional(self, node: fx.Node, x: TensorInfo, values: Mapping[str, Any], macs: Mapping[str, int]
                    ) -> LayerSpec | None:
        """F.linear / F.convNd (and their ATen overloads) whose weight is a parameter (deployment folds and fuses
        conv modules only: a functional conv is timed alone)."""
        name = getattr(node.target, "__name__", "").split(".")[0]
        if name not in ("linear", "conv1d", "conv2d", "conv3d") or len(node.args) < 2:
            return None
        weight = node.args[1]
        if not (isinstance(weight, fx.Node) and weight.op == "get_attr"):
            return None
        w = values.get(weight.name)
        if not isinstance(w, TensorInfo):
            return None
        key = str(weight.target)

        def arg(i: int, kw: str, default: Any) -> Any:
            return node.args[i] if len(node.args) > i else node.kwargs.get(kw, default)

        has_bias = arg(2, "bias", None) is not None
        if name == "linear":
            return LayerSpec(key, "linear", w.shape[1], w.shape[0], tuple(x.shape[1:]), bias=has_bias,
                             macs=float(macs.get(key, 0)))
        nd = len(w.shape) - 2

        def tup(v: Any) -> tuple[int, ...]:
            return tuple(v) if isinstance(v, (tuple, list)) else (int(v),) * nd

        groups = int(arg(6, "groups", 1))
        padding = arg(4, "padding", 0)
        return LayerSpec(key, "conv", w.shape[1] * groups, w.shape[0], tuple(x.shape[1:]), tuple(w.shape[2:]),
                         tup(arg(3, "stride", 1)), padding if isinstance(padding, str) else tup(padding),
                         tup(arg(5, "dilation", 1)), groups, has_bias, macs=float(macs.get(key, 0)))

    def _table(self, spec: LayerSpec, dims: dict[int, tuple[int, np.ndarray]], prunable: set[int],
               measure: LatencyFn) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        """(out widths, in widths or None when the input follows the output or never shrinks, ms grid)."""
        grouped = spec.op == "conv" and spec.groups > 1
        unit_out = math.lcm(self.step, spec.out_channels // spec.groups) if grouped else self.step
        out_grid = (_grid(spec.out_channels, min(unit_out, spec.out_channels), self.grid_points)
                    if 0 in dims and dims[0][0] in prunable else np.asarray([spec.out_channels]))
        in_varies = not grouped and 1 in dims and dims[1][0] in prunable
        in_grid = _grid(spec.in_channels, min(self.step, spec.in_channels), self.grid_points) if in_varies else None
        ins = in_grid if in_grid is not None else np.asarray([spec.in_channels])
        ms = np.zeros((len(out_grid), len(ins)))
        for a, o in enumerate(out_grid):
            for b, i in enumerate(ins):
                key = (*self._setting, *spec.signature(int(i), int(o)))
                if key not in self.cache:
                    signature = spec.signature(int(i), int(o))
                    stored = self._disk.get(signature) if self._disk is not None else None
                    if stored is None:
                        stored = float(measure(spec, spec.in_at(int(i), int(o)), int(o)))
                        self.measured += 1
                        if self._disk is not None:
                            self._disk.put(signature, stored)
                    self.cache[key] = stored
                ms[a, b] = self.cache[key]
        return out_grid, in_grid, ms

    # ----- queries
    def layer_ms(self, i: int, in_w: int, out_w: int) -> float:
        """Estimated ms of layer ``i`` with ``in_w`` input and ``out_w`` output channels."""
        memo = (i, int(in_w), int(out_w))
        if memo not in self._memo:
            out_grid, in_grid, ms = self._tables[i]
            rows = ms[:, 0] if in_grid is None else np.asarray([np.interp(in_w, in_grid, r) for r in ms])
            self._memo[memo] = float(np.interp(out_w, out_grid, rows))
        return self._memo[memo]

    def widths(self, i: int, kept: Mapping[int, np.ndarray]) -> tuple[int, int]:
        """(in, out) channels of layer ``i`` under ``kept`` (group id → keep vector; others full)."""
        spec, dims = self.layers[i], self._dims[i]
        w = [spec.out_channels, spec.in_channels]
        for d, (gid, structure_of) in dims.items():
            if gid in kept and len(structure_of):
                w[d] = int(np.asarray(kept[gid])[structure_of].sum())
        return spec.in_at(w[1], w[0]), w[0]

    def after(self, keep: Mapping[int, np.ndarray]) -> float:
        """Estimated ms with the structures ``keep`` marks False removed (groups not given keep all)."""
        return float(sum(self.layer_ms(i, *self.widths(i, keep)) for i in range(len(self.layers))))

    def reduction(self, keep: Mapping[int, np.ndarray]) -> float:
        """Estimated dense ms / ms after removal."""
        return self.total / max(self.after(keep), 1e-12)

    def network_ms(self, model: nn.Module) -> float:
        """Measured ms of a whole (pruned) network: ``measure(model)`` if given, else the p50 of an eager timing
        on this model's device, dtype and batch (its :class:`~sparsify.measure.bench.Timing` is appended to
        ``network_timings``). ``model`` may be moved and put in eval mode: pass a copy."""
        if self.measure is not None:
            ms = float(self.measure(model))
            if not math.isfinite(ms) or ms <= 0:
                raise ValueError(f"the measure function returned {ms!r} ms; it must return a positive latency")
            return ms
        timing = network_latency(model, self.graph.traced.inputs, batch=self.batch, device=self.device,
                                 dtype=self.dtype, channels_last=self.channels_last, **self.network_bench)
        self.network_timings.append(timing.as_dict())
        return timing.p50

    def describe(self) -> dict[str, Any]:
        """Settings and counts, for reports."""
        return {"layers": len(self.layers), "configurations_timed": self.measured, "cache_size": len(self.cache),
                "batch": self.batch, "device": str(self.device), "dtype": str(self.dtype), "step": self.step,
                "grid_points": self.grid_points, "total_ms": self.total, "skipped": dict(self.skipped),
                "in_context": self._setting[5], "cast_params": self._setting[6], "disk_cache": self.disk_cache_path,
                "network_timings": list(self.network_timings)}
