"""Measurement on the user's device: trusted timing, fast widths, a per-layer latency model, GPU time by kernel."""

from sparsify.measure.bench import Timing as Timing
from sparsify.measure.bench import benchmark as benchmark
from sparsify.measure.breakdown import kernel_kind as kernel_kind
from sparsify.measure.breakdown import time_by_kind as time_by_kind
from sparsify.measure.cudnn import cudnn_autotune as cudnn_autotune
from sparsify.measure.latency_model import LatencyModel as LatencyModel
from sparsify.measure.latency_model import LayerSpec as LayerSpec
from sparsify.measure.network import network_latency as network_latency
from sparsify.measure.progress import progress as progress
from sparsify.measure.timing import autocast_context as autocast_context
from sparsify.measure.timing import cuda_autocast_dtype as cuda_autocast_dtype
from sparsify.measure.timing import measure_latency as measure_latency
from sparsify.measure.widths import WidthTable as WidthTable
from sparsify.measure.widths import suggest_round_to as suggest_round_to
from sparsify.measure.widths import width_latency_table as width_latency_table

__all__ = [
    "LatencyModel",
    "LayerSpec",
    "Timing",
    "WidthTable",
    "autocast_context",
    "benchmark",
    "cuda_autocast_dtype",
    "cudnn_autotune",
    "kernel_kind",
    "measure_latency",
    "network_latency",
    "progress",
    "suggest_round_to",
    "time_by_kind",
    "width_latency_table",
]
