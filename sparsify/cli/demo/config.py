"""Every setting of a ``sparsify demo`` run, and how the command line fills them in."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

DATASETS = ("digits", "cifar10", "fashion-mnist")
DEFAULT_EPOCHS = {"digits": 30, "fashion-mnist": 5, "cifar10": 10}  # only digits is tuned (about 2 min on CPU)


@dataclass
class DemoConfig:
    """Every setting of a demo run (the defaults are the tuned digits recipe)."""

    data: str = "digits"
    data_path: Path | None = None
    out: Path = Path("sparsify-demo-out")
    seed: int = 0
    quick: bool = False
    arch: str = "residual"  # "residual" (blocks with shortcuts) or "plain" (a conv-BN-ReLU stack)
    epochs: int = 30
    finetune_epochs: int = 2
    batch_size: int = 64
    lr: float = 0.1  # SGD with momentum; 1 epoch linear warmup, then cosine to 0 (per step)
    momentum: float = 0.9
    weight_decay: float = 5e-4  # conv/linear weights (and BN of the dense baseline)
    bn_weight_decay: float = 5e-2  # STR-BN γ and β̂: γ must shrink below the threshold (≤ 0.5, see below)
    s_init: float = -5.0  # STR: sigmoid(s_init) is the initial threshold
    threshold_decay: float = 2e-2  # STR: L2 decay on s, its only decay (no optimizer decay on thresholds)
    gamma_init: str = "ones"  # "ones" (standard) or "uniform" (γ ~ U(0.1, 1): quick runs prune at once)
    finetune_lr: float = 1e-3  # after prune: cosine from this to 0, BN decay back to weight_decay
    baseline: bool = True
    max_steps_per_epoch: int | None = None
    train_limit: int | None = None  # use only the first N training images (quick runs)
    test_limit: int | None = None
    latency_batch: int = 256
    latency_repeats: int = 20
    threads: int = 1  # torch CPU threads; more gain little on these small convs and collapse on busy cores


def quick_config(config: DemoConfig) -> DemoConfig:
    """Tiny settings: a few steps of every phase, for tests."""
    return DemoConfig(**{**asdict(config), "epochs": 2, "finetune_epochs": 1, "max_steps_per_epoch": 3,
                         "train_limit": 256, "test_limit": 128, "latency_batch": 32, "latency_repeats": 3,
                         "s_init": 0.0, "gamma_init": "uniform", "quick": True})


def config_from_args(args: Any) -> DemoConfig:
    """A ``DemoConfig`` from the CLI's parsed arguments."""
    config = DemoConfig(data=args.data, data_path=Path(args.data_path) if args.data_path else None,
                        out=Path(args.out), seed=args.seed, arch=args.arch, baseline=not args.no_baseline,
                        epochs=args.epochs if args.epochs is not None else DEFAULT_EPOCHS[args.data],
                        threads=args.threads or (1 if args.data == "digits" else torch.get_num_threads()))
    if args.finetune_epochs is not None:
        config.finetune_epochs = args.finetune_epochs
    return quick_config(config) if args.quick else config


def as_json(config: DemoConfig) -> dict[str, Any]:
    """The settings as JSON-able values (paths as strings)."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()}
