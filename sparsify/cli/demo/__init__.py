"""``sparsify demo``: train a small CNN with STR-BN on a real data set, prune it, and report.

The run: (1) a dense baseline with the training recipe, (2) the same network trained with STR-BN
(adapter ``bn_gamma``, policy ``str``), (3) ``Sparsifier.prune(optimizer=...)``, checking that the
pruned model computes the soft model's outputs on the whole test set, (4) a short fine-tune of the
pruned model with the same optimizer. Accuracy, parameters, MACs, CPU latency and per-group widths
are printed (rich) and written to ``--out`` as ``demo.json`` and ``widths.png``.

``data`` loads the data sets, ``model`` builds the CNN, ``train`` trains, evaluates and times it,
``report`` prints and writes the results; this module runs the phases in order.
"""

from __future__ import annotations

import platform
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn

from sparsify.cli.demo.config import DATASETS, DEFAULT_EPOCHS, DemoConfig, as_json, config_from_args, quick_config
from sparsify.cli.demo.data import Data, load_data
from sparsify.cli.demo.model import DemoNet, build_model
from sparsify.cli.demo.report import layer_rows, layer_widths, print_report, width_rows, write_outputs
from sparsify.cli.demo.train import accuracy, latencies_ms, make_optimizer, predict
from sparsify.cli.demo.train import train as train_model  # not `train`: that name is the submodule

__all__ = ["DATASETS", "DEFAULT_EPOCHS", "DemoConfig", "DemoNet", "load_data", "main", "quick_config", "run_demo"]


def run_demo(config: DemoConfig, console: Console | None = None) -> dict[str, Any]:
    """Run the whole demo; returns the JSON-able results (also written to ``config.out``)."""
    console = console or Console()
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        return _run(config, console)
    finally:
        torch.set_num_threads(threads)


def _model(data: Data, config: DemoConfig, gamma_init: str = "ones") -> DemoNet:
    return build_model(data.image_shape, len(data.classes), config.arch, gamma_init)


def _latency_batch(x: torch.Tensor, batch: int) -> torch.Tensor:
    """``batch`` test images (repeated when there are fewer)."""
    x = x[:batch]
    return x if len(x) >= batch else x.repeat((batch + len(x) - 1) // len(x), 1, 1, 1)[:batch]


def _run(config: DemoConfig, console: Console) -> dict[str, Any]:
    from sparsify import Sparsifier
    from sparsify.policies.soft_threshold import STRConfig

    t_start = time.perf_counter()
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    data = load_data(config.data, config.data_path, config.train_limit, config.test_limit)
    console.print(f"[bold]sparsify demo[/]: {data.name}, {len(data.x_train)} train / {len(data.x_test)} test images "
                  f"of {'×'.join(map(str, data.image_shape))}, {len(data.classes)} classes; arch {config.arch}; "
                  f"{torch.get_num_threads()} torch threads")
    example = data.x_test[:1]
    results: dict[str, Any] = {"config": as_json(config),
                               "data": {"name": data.name, "train": len(data.x_train), "test": len(data.x_test),
                                        "image_shape": list(data.image_shape), "classes": len(data.classes)},
                               "env": {"torch": torch.__version__, "threads": torch.get_num_threads(),
                                       "python": platform.python_version(), "machine": platform.machine()}}
    timings: dict[str, float] = {}
    columns = (TextColumn("{task.description:<13}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("{task.fields[info]}"))
    with Progress(*columns, console=console) as progress:
        dense: nn.Module | None = None
        if config.baseline:
            t0 = time.perf_counter()
            torch.manual_seed(config.seed)
            dense = _model(data, config)
            dense_opt = make_optimizer(dense, config, bn_weight_decay=config.weight_decay)
            hist = train_model(dense, dense_opt, data, config.epochs, config, progress, "dense")
            results["dense"] = {"test_acc": hist[-1]["test_acc"], "history": hist}
            timings["dense_train_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        torch.manual_seed(config.seed)
        model = _model(data, config, config.gamma_init)
        policy = STRConfig(s_init=config.s_init, threshold_decay=config.threshold_decay)
        sp = Sparsifier(model, example, adapter="bn_gamma", policy=policy)
        opt = make_optimizer(model, config, sp.parameters())
        hist = train_model(model, opt, data, config.epochs, config, progress, "STR-BN", sparsifier=sp)
        timings["str_train_s"] = time.perf_counter() - t0

        # ----- before prune: soft model --------------------------------------------------------------
        report = sp.report()
        soft_logits = predict(model, data.x_test)
        soft_acc = accuracy(soft_logits, data.y_test)
        x_lat = _latency_batch(data.x_test, config.latency_batch)
        # the unpruned architecture without STR parametrizations: the dense baseline (or an untrained copy)
        reference = dense if dense is not None else _model(data, config)
        lat_soft, lat_dense_arch_before = latencies_ms([model, reference], x_lat, config.latency_repeats)
        bn_names = {id(v.handle): v.name for v in sp.vectors}
        group_bns = {g.name: [bn_names[id(v.handle)] for v in g.vectors] for g in sp.groups}
        widths_before = {g.name: g.width for g in sp.groups}
        layers_before = layer_widths(model)
        thresholds = dict(report.thresholds)

        # ----- prune ----------------------------------------------------------------------------------
        t0 = time.perf_counter()
        result = sp.prune(optimizer=opt)
        timings["prune_s"] = time.perf_counter() - t0
        pruned_logits = predict(model, data.x_test)
        diff = float((pruned_logits.double() - soft_logits.double()).abs().max())
        scale = 1.0 + float(soft_logits.double().abs().max())
        equal = diff <= 1e-4 * scale
        lat_pruned, lat_dense_arch = latencies_ms([model, reference], x_lat, config.latency_repeats)
        pruned_acc = accuracy(pruned_logits, data.y_test)

        # ----- fine-tune the pruned model with the same optimizer -------------------------------------
        t0 = time.perf_counter()
        for group in opt.param_groups:  # cosine from finetune_lr; the sparsity pressure on BN is no longer needed
            group["initial_lr"] = group["lr"] = config.finetune_lr
            if group["role"] == "bn":
                group["weight_decay"] = config.weight_decay
        ft_hist = train_model(model, opt, data, config.finetune_epochs, config, progress, "fine-tune", warmup=False)
        timings["finetune_s"] = time.perf_counter() - t0
    ft_acc = ft_hist[-1]["test_acc"] if ft_hist else pruned_acc

    widths = width_rows(widths_before, result.widths, group_bns)
    results.update({
        "str": {"test_acc": soft_acc, "channel_sparsity": report.channel_sparsity, "thresholds": thresholds,
                "history": hist},
        "prune": {"test_acc": pruned_acc, "max_abs_diff": diff, "allowed_abs_diff": 1e-4 * scale,
                  "outputs_equal": equal, "params_before": result.params_before, "params_after": result.params_after,
                  "macs_before": result.macs_before, "macs_after": result.macs_after,
                  "channels_before": sum(w["before"] for w in widths),
                  "channels_after": sum(w["after"] for w in widths),
                  "kept_to_stay_connected": result.kept_to_stay_connected, "folds": len(result.surgery.folds)},
        "latency_ms": {"batch": config.latency_batch, "repeats": config.latency_repeats,
                       "before_prune": lat_soft, "after_prune": lat_pruned,
                       "unpruned_arch_plain_bn_before": lat_dense_arch_before,
                       "unpruned_arch_plain_bn_after": lat_dense_arch},
        "finetune": {"test_acc": ft_acc, "epochs": config.finetune_epochs, "lr": config.finetune_lr,
                     "history": ft_hist},
        "widths": widths,
        "layers": layer_rows(layers_before, layer_widths(model)),
    })
    timings["total_s"] = time.perf_counter() - t_start
    results["timings_s"] = timings

    print_report(console, results)
    write_outputs(out, results, model)
    console.print(f"wrote {out / 'demo.json'} and {out / 'widths.png'} ({timings['total_s']:.1f} s in all)")
    return results


def main(args: Any) -> int:
    """Entry point of ``sparsify demo`` (``args`` from the CLI parser); 1 if pruning changed the outputs."""
    from sparsify.errors import SparsifyError

    try:
        results = run_demo(config_from_args(args))
    except SparsifyError as exc:
        Console(stderr=True).print(f"[red]error[/]: {exc}")
        return 1
    if not results["prune"]["outputs_equal"]:
        Console(stderr=True).print(
            f"[red]error[/]: the pruned model's outputs differ from the soft model's by "
            f"{results['prune']['max_abs_diff']:.3g} (allowed {results['prune']['allowed_abs_diff']:.3g})")
        return 1
    return 0
