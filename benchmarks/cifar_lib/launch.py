"""``--parallel``: several runs of the harness as processes sharing the one GPU, at most ``--max-procs`` at once."""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

#: options passed on unchanged to every run (flags with a value; None values are left out)
VALUE_OPTIONS = ("model", "epochs", "prune_epoch", "init", "sparsify_epochs", "finetune_epochs", "batch", "lr", "wd",
                 "seed", "data", "ramp_end", "tp_reg_every", "tp_importance", "round_to", "slimming_l1", "out",
                 "eval_every", "cache", "limit", "device", "stop_after_s")
SWITCHES = ("no_graphs", "fp32", "sync_bn", "save_model", "no_latency")


def passthrough(args: argparse.Namespace) -> list[str]:
    """The command-line options of ``args`` that every launched run gets."""
    out: list[str] = []
    for name in VALUE_OPTIONS:
        if getattr(args, name) is not None:
            out += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    return out + [f"--{name.replace('_', '-')}" for name in SWITCHES if getattr(args, name)]


def commands(args: argparse.Namespace, specs: list[str]) -> list[tuple[str, list[str]]]:
    """``(spec, command)`` per ``arm[:ratio]`` (ratio 2 where left out)."""
    runs = []
    for spec in specs:
        arm, _, ratio = spec.partition(":")
        runs.append((spec, [sys.executable, "-m", "benchmarks.cifar", "--arm", arm, "--ratio", ratio or "2",
                            *passthrough(args)]))
    return runs


def parallel(args: argparse.Namespace, specs: list[str]) -> dict[str, int]:
    """Run one process per ``arm[:ratio]``, at most ``args.max_procs`` at once (all at once when None: the
    GPU is launch-bound with one); each writes its log next to its JSON. Returns the exit codes."""
    pending = commands(args, specs)
    limit = args.max_procs or len(pending)
    running: list[tuple[str, subprocess.Popen, object]] = []
    codes: dict[str, int] = {}
    while pending or running:
        while pending and len(running) < limit:
            spec, cmd = pending.pop(0)
            log = open(Path(args.out) / f"{spec.replace(':', '_')}_seed{args.seed}.log", "w")  # closed below
            running.append((spec, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log))
        for item in list(running):
            spec, proc, log = item
            if proc.poll() is not None:
                log.close()
                running.remove(item)
                codes[spec] = proc.returncode
                print(f"{spec}: exit {proc.returncode}", flush=True)
        time.sleep(0.5)
    return codes
