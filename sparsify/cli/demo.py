"""``sparsify demo``: train a small CNN with STR-BN on a real data set, prune it, and report.

The run: (1) a dense baseline with the training recipe, (2) the same network trained with STR-BN
(adapter ``bn_gamma``, policy ``str``), (3) ``Sparsifier.prune(optimizer=...)``, checking that the
pruned model computes the soft model's outputs on the whole test set, (4) a short fine-tune of the
pruned model with the same optimizer. Accuracy, parameters, MACs, CPU latency and per-group widths
are printed (rich) and written to ``--out`` as ``demo.json`` and ``widths.png``.
"""

from __future__ import annotations

import gzip
import io
import json
import math
import platform
import statistics
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from torch import nn

DATASETS = ("digits", "cifar10", "fashion-mnist")
DEFAULT_EPOCHS = {"digits": 30, "fashion-mnist": 5, "cifar10": 10}  # only digits is tuned (about 2 min on CPU)
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
_BN = nn.modules.batchnorm._BatchNorm


# ----- configuration -----------------------------------------------------------------------------
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


# ----- data --------------------------------------------------------------------------------------
@dataclass
class Data:
    """Normalised image tensors (N, C, H, W) and int64 labels."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: list[str]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.x_train.shape[1:])  # type: ignore[return-value]


def _normalise(x_train: np.ndarray, x_test: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel standardisation with the training set's statistics."""
    mean = x_train.mean(axis=(0, 2, 3), keepdims=True)
    std = x_train.std(axis=(0, 2, 3), keepdims=True) + 1e-6
    return (torch.from_numpy(((x_train - mean) / std).astype(np.float32)),
            torch.from_numpy(((x_test - mean) / std).astype(np.float32)))


def load_digits_data(split_seed: int = 0) -> Data:
    """scikit-learn's bundled 8×8 digits (1,797 images), stratified 75/25 split with a fixed seed."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as exc:
        raise SystemExit("the digits data set needs scikit-learn: pip install 'sparsify-structured[demo]'") from exc
    digits = load_digits()
    x = (digits.data.reshape(-1, 1, 8, 8) / 16.0).astype(np.float64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, digits.target, test_size=0.25, stratify=digits.target,
                                              random_state=split_seed)
    xt, xe = _normalise(x_tr, x_te)
    return Data("digits", xt, torch.as_tensor(y_tr, dtype=torch.int64), xe, torch.as_tensor(y_te, dtype=torch.int64),
                [str(c) for c in digits.target_names])


def _read_idx(path: Path) -> np.ndarray:
    """An IDX file (optionally .gz), as used by MNIST and Fashion-MNIST."""
    opener: Callable[..., Any] = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08:
        raise SystemExit(f"{path} is not an unsigned-byte IDX file")
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_fashion_mnist(path: Path | None) -> Data:
    """Fashion-MNIST from its IDX files (Debian: ``apt-get install dataset-fashion-mnist``)."""
    root = Path(path) if path is not None else FASHION_MNIST_DIR

    def find(stem: str) -> Path:
        for name in (f"{stem}.gz", stem):
            if (root / name).is_file():
                return root / name
        raise SystemExit(f"Fashion-MNIST file {stem}[.gz] not found in {root}; install the Debian package "
                         "dataset-fashion-mnist or pass --data-path to a folder with the IDX files")

    x_tr = _read_idx(find("train-images-idx3-ubyte"))[:, None].astype(np.float64) / 255.0
    y_tr = _read_idx(find("train-labels-idx1-ubyte"))
    x_te = _read_idx(find("t10k-images-idx3-ubyte"))[:, None].astype(np.float64) / 255.0
    y_te = _read_idx(find("t10k-labels-idx1-ubyte"))
    xt, xe = _normalise(x_tr, x_te)
    classes = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
               "Ankle boot"]
    return Data("fashion-mnist", xt, torch.as_tensor(y_tr.astype(np.int64)), xe,
                torch.as_tensor(y_te.astype(np.int64)), classes)


def _subset(n: int, limit: int | None, seed: int = 0) -> np.ndarray:
    """Indices of a fixed-seed random subset of ``limit`` of ``n`` items (all, in order, without a limit);
    files sorted by class make a prefix useless."""
    if limit is None or limit >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).permutation(n)[:limit])


def _decode_jpegs(blob: np.ndarray, offsets: np.ndarray, indices: np.ndarray) -> np.ndarray:
    from PIL import Image

    out = np.empty((len(indices), 32, 32, 3), dtype=np.uint8)
    for j, i in enumerate(indices):
        with Image.open(io.BytesIO(blob[offsets[i]:offsets[i + 1]].tobytes())) as im:
            out[j] = np.asarray(im.convert("RGB"))
    return out.transpose(0, 3, 1, 2)


def load_cifar10(path: Path | None, train_limit: int | None = None, test_limit: int | None = None) -> Data:
    """CIFAR-10 from the JPEG ``.npz`` (keys ``{train,test}_{jpeg,offsets,labels}``, ``classes``); with a
    limit, only a fixed random subset is decoded."""
    if path is None or not Path(path).is_file():
        raise SystemExit("--data cifar10 needs --data-path pointing at cifar10_jpeg.npz "
                         f"(got {str(path) if path else 'none'})")
    with np.load(path, allow_pickle=False) as z:
        tr = _subset(len(z["train_labels"]), train_limit)
        te = _subset(len(z["test_labels"]), test_limit)
        x_tr = _decode_jpegs(z["train_jpeg"], z["train_offsets"], tr).astype(np.float64) / 255.0
        x_te = _decode_jpegs(z["test_jpeg"], z["test_offsets"], te).astype(np.float64) / 255.0
        y_tr, y_te = z["train_labels"][tr], z["test_labels"][te]
        classes = [str(c) for c in z["classes"]]
    xt, xe = _normalise(x_tr, x_te)
    return Data("cifar10", xt, torch.as_tensor(y_tr.astype(np.int64)), xe, torch.as_tensor(y_te.astype(np.int64)),
                classes)


def load_data(config: DemoConfig) -> Data:
    """The data set of ``config``, cut to fixed random subsets of ``train_limit``/``test_limit`` images."""
    if config.data == "digits":
        data = load_digits_data()
    elif config.data == "fashion-mnist":
        data = load_fashion_mnist(config.data_path)
    elif config.data == "cifar10":
        data = load_cifar10(config.data_path, config.train_limit, config.test_limit)
    else:
        raise SystemExit(f"unknown data set {config.data!r}; choose one of {', '.join(DATASETS)}")
    tr, te = _subset(len(data.x_train), config.train_limit), _subset(len(data.x_test), config.test_limit)
    data.x_train, data.y_train = data.x_train[tr], data.y_train[tr]
    data.x_test, data.y_test = data.x_test[te], data.y_test[te]
    return data


# ----- model -------------------------------------------------------------------------------------
def _conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout)]


class Block(nn.Module):
    """Two 3×3 conv-BN pairs with ReLUs; with ``residual``, a shortcut (1×1 conv-BN when the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int = 1, residual: bool = True) -> None:
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(cin, cout, 3, stride)
        self.conv2, self.bn2 = _conv_bn(cout, cout, 3, 1)
        self.relu = nn.ReLU()
        self.residual = residual
        self.shortcut = (nn.Sequential(*_conv_bn(cin, cout, 1, stride))
                         if residual and (stride != 1 or cin != cout) else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        if self.residual:
            y = y + (x if self.shortcut is None else self.shortcut(x))
        return self.relu(y)


class DemoNet(nn.Module):
    """Stem conv-BN-ReLU, one ``Block`` per stage, global average pool, linear classifier."""

    def __init__(self, in_channels: int, num_classes: int, stem: int, stages: Sequence[tuple[int, int]],
                 residual: bool = True) -> None:
        super().__init__()
        self.stem = nn.Sequential(*_conv_bn(in_channels, stem), nn.ReLU())
        blocks, cin = [], stem
        for width, stride in stages:
            blocks.append(Block(cin, width, stride, residual))
            cin = width
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.blocks(self.stem(x))), 1))


def build_model(data: Data, arch: str, gamma_init: str = "ones") -> DemoNet:
    """The demo CNN for ``data``: 2 stages on 8×8 digits, 3 on 28/32-pixel images."""
    in_channels, size, _ = data.image_shape
    stages = [(32, 1), (64, 2)] if size <= 8 else [(32, 1), (64, 2), (128, 2)]
    model = DemoNet(in_channels, len(data.classes), 32, stages, residual=arch == "residual")
    if gamma_init == "uniform":
        for m in model.modules():
            if isinstance(m, _BN):
                nn.init.uniform_(m.weight, 0.1, 1.0)
    elif gamma_init != "ones":
        raise ValueError(f"gamma_init must be 'ones' or 'uniform', got {gamma_init!r}")
    return model


# ----- training ----------------------------------------------------------------------------------
def make_optimizer(model: nn.Module, config: DemoConfig, thresholds: Sequence[nn.Parameter] = (),
                   bn_weight_decay: float | None = None) -> torch.optim.SGD:
    """SGD with parameter groups by role: conv/linear weights, BN γ/β̂, STR thresholds (no optimizer decay)."""
    from sparsify.adapters.base import original

    thr = {id(p) for p in thresholds}
    bn = {id(original(m, n)) for m in model.modules() if isinstance(m, _BN) for n in ("weight", "bias")
          if getattr(m, n, None) is not None}
    weights = [p for p in model.parameters() if id(p) not in thr and id(p) not in bn]
    bn_params = [p for p in model.parameters() if id(p) in bn]
    groups = [{"params": weights, "weight_decay": config.weight_decay, "role": "weights"},
              {"params": bn_params, "role": "bn",
               "weight_decay": config.bn_weight_decay if bn_weight_decay is None else bn_weight_decay}]
    if thresholds:
        groups.append({"params": list(thresholds), "weight_decay": 0.0, "role": "thresholds"})
    return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum)


def warmup_cosine(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """LR factor: linear warmup, then cosine to 0."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        t = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))
    return factor


def batches(n: int, batch_size: int, generator: torch.Generator, limit: int | None = None) -> list[torch.Tensor]:
    """Shuffled index batches of one epoch (the last partial batch is dropped when there are full ones)."""
    perm = torch.randperm(n, generator=generator)
    out = [perm[i:i + batch_size] for i in range(0, n, batch_size)]
    if len(out) > 1 and len(out[-1]) < batch_size:
        out = out[:-1]
    return out[:limit] if limit is not None else out


def augment(x: torch.Tensor, generator: torch.Generator, flip: bool) -> torch.Tensor:
    """Random translation by up to 1/8 of the image (zero padding), and horizontal flips if ``flip``."""
    n, _, h, w = x.shape
    pad = max(1, h // 8)
    padded = F.pad(x, (pad, pad, pad, pad))
    dy, dx = torch.randint(0, 2 * pad + 1, (2,), generator=generator).tolist()
    x = padded[:, :, dy:dy + h, dx:dx + w]
    if flip:
        mask = torch.rand(n, generator=generator) < 0.5
        x = torch.where(mask[:, None, None, None], x.flip(3), x)
    return x


@torch.inference_mode()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Eval-mode logits for all of ``x``."""
    was_training = model.training
    model.eval()
    try:
        return torch.cat([model(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])
    finally:
        model.train(was_training)


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return float((logits.argmax(1) == y).double().mean())


def train(model: nn.Module, optimizer: torch.optim.Optimizer, data: Data, epochs: int, config: DemoConfig,
          progress: Progress, label: str, *, sparsifier: Any = None, warmup: bool = True) -> list[dict[str, float]]:
    """Train for ``epochs`` with a cosine LR from each group's ``initial_lr`` (``lr`` if unset) to 0, after a
    1-epoch linear warmup if ``warmup``. Returns the per-epoch history."""
    gen = torch.Generator().manual_seed(config.seed)
    per_epoch = len(batches(len(data.x_train), config.batch_size, gen, config.max_steps_per_epoch))
    total = per_epoch * epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total, per_epoch if warmup else 0))
    flip = data.name == "cifar10"
    task = progress.add_task(label, total=total, info="")
    history: list[dict[str, float]] = []
    model.train()
    for epoch in range(epochs):
        loss_sum, seen = 0.0, 0
        for idx in batches(len(data.x_train), config.batch_size, gen, config.max_steps_per_epoch):
            x = augment(data.x_train[idx], gen, flip)
            loss = F.cross_entropy(model(x), data.y_train[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            if sparsifier is not None:
                sparsifier.step()
            loss_sum += float(loss.detach()) * len(idx)
            seen += len(idx)
            progress.advance(task)
        row = {"epoch": epoch + 1, "loss": loss_sum / max(seen, 1),
               "test_acc": accuracy(predict(model, data.x_test), data.y_test)}
        info = f"loss {row['loss']:.3f}  test acc {row['test_acc']:.2%}"
        if sparsifier is not None:
            rep = sparsifier.report()
            row["channel_sparsity"] = rep.channel_sparsity
            row["mean_threshold"] = float(np.mean(list(rep.thresholds.values()))) if rep.thresholds else 0.0
            info += f"  channel sparsity {rep.channel_sparsity:.1%}"
        history.append(row)
        progress.update(task, info=f"epoch {epoch + 1}/{epochs}  {info}")
    return history


# ----- measuring ---------------------------------------------------------------------------------
def latencies_ms(models: Sequence[nn.Module], x: torch.Tensor, repeats: int, warmup: int = 3) -> list[float]:
    """Median CPU latency of ``model(x)`` per model (eval, inference_mode); the models take turns each round
    so that load from other processes hits them alike."""
    times: list[list[float]] = [[] for _ in models]
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        with torch.inference_mode():
            for r in range(warmup + repeats):
                for i, m in enumerate(models):
                    t0 = time.perf_counter()
                    m(x)
                    if r >= warmup:
                        times[i].append((time.perf_counter() - t0) * 1e3)
    finally:
        for m, mode in zip(models, modes, strict=True):
            m.train(mode)
    return [statistics.median(t) for t in times]


def count_macs(model: nn.Module, example: torch.Tensor) -> int:
    """MACs of one forward pass on ``example`` (sparsify's tracer)."""
    from sparsify.graph.cost import module_macs
    from sparsify.graph.trace import trace

    return int(sum(module_macs(trace(model, example)).values()))


def layer_widths(model: nn.Module) -> dict[str, tuple[int, int]]:
    """(input, output) channels of every conv and linear layer."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            out[name] = (m.in_channels, m.out_channels)
        elif isinstance(m, nn.Linear):
            out[name] = (m.in_features, m.out_features)
    return out


# ----- reporting ---------------------------------------------------------------------------------
def short_group_name(name: str, limit: int = 48) -> str:
    return name if len(name) <= limit else name[:limit - 1] + "…"


def save_widths_plot(widths: list[dict[str, Any]], path: Path, title: str) -> None:
    """Grouped bars: width of every layer before and after pruning (``label``, ``before``, ``after``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [w["label"] for w in widths]
    before = np.array([w["before"] for w in widths])
    after = np.array([w["after"] for w in widths])
    pos = np.arange(len(widths))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(widths) + 2.5), 4.8), dpi=120)
    ax.bar(pos - 0.2, before, 0.4, label="before prune", color="#b8c7dc", edgecolor="#4a6a94")
    bars = ax.bar(pos + 0.2, after, 0.4, label="after prune", color="#2f6db3")
    for rect, b, a in zip(bars, before, after, strict=True):
        ax.annotate(f"{a}/{b}", (rect.get_x() + rect.get_width() / 2, a), xytext=(0, 3), textcoords="offset points",
                    ha="center", va="bottom", fontsize=8)
    ax.set_xticks(pos, labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("channels")
    ax.set_title(title, fontsize=10)
    ax.set_ylim(0, before.max() * 1.15 if len(before) else 1)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _group_label(name: str, members: Sequence[str]) -> str:
    """A readable label for a channel group: the BNs that carry its importance vectors."""
    return " + ".join(members) if members else short_group_name(name, 24)


def _fmt_ratio(before: float, after: float) -> str:
    return f"{before / after:.2f}×" if after else "–"


# ----- the demo ----------------------------------------------------------------------------------
def run_demo(config: DemoConfig, console: Console | None = None) -> dict[str, Any]:
    """Run the whole demo; returns the JSON-able results (also written to ``config.out``)."""
    console = console or Console()
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        return _run(config, console)
    finally:
        torch.set_num_threads(threads)


def _run(config: DemoConfig, console: Console) -> dict[str, Any]:
    from sparsify import Sparsifier
    from sparsify.policies.soft_threshold import STRConfig

    t_start = time.perf_counter()
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    data = load_data(config)
    console.print(f"[bold]sparsify demo[/]: {data.name}, {len(data.x_train)} train / {len(data.x_test)} test images "
                  f"of {'×'.join(map(str, data.image_shape))}, {len(data.classes)} classes; arch {config.arch}; "
                  f"{torch.get_num_threads()} torch threads")
    example = data.x_test[:1]
    results: dict[str, Any] = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()},
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
            dense = build_model(data, config.arch)
            dense_opt = make_optimizer(dense, config, bn_weight_decay=config.weight_decay)
            hist = train(dense, dense_opt, data, config.epochs, config, progress, "dense")
            results["dense"] = {"test_acc": hist[-1]["test_acc"], "history": hist}
            timings["dense_train_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        torch.manual_seed(config.seed)
        model = build_model(data, config.arch, config.gamma_init)
        policy = STRConfig(s_init=config.s_init, threshold_decay=config.threshold_decay)
        sp = Sparsifier(model, example, adapter="bn_gamma", policy=policy)
        opt = make_optimizer(model, config, sp.parameters())
        hist = train(model, opt, data, config.epochs, config, progress, "STR-BN", sparsifier=sp)
        timings["str_train_s"] = time.perf_counter() - t0

        # ----- before prune: soft model --------------------------------------------------------------
        report = sp.report()
        soft_logits = predict(model, data.x_test)
        soft_acc = accuracy(soft_logits, data.y_test)
        x_lat = data.x_test[:config.latency_batch]
        if len(x_lat) < config.latency_batch:
            x_lat = x_lat.repeat((config.latency_batch + len(x_lat) - 1) // len(x_lat), 1, 1, 1)[:config.latency_batch]
        # the unpruned architecture without STR parametrizations: the dense baseline (or an untrained copy)
        reference = dense if dense is not None else build_model(data, config.arch)
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
        ft_hist = train(model, opt, data, config.finetune_epochs, config, progress, "fine-tune", warmup=False)
        timings["finetune_s"] = time.perf_counter() - t0
    ft_acc = ft_hist[-1]["test_acc"] if ft_hist else pruned_acc

    widths = []
    for name, before in widths_before.items():
        after = result.widths.get(name, (before, before))[1]
        widths.append({"group": name, "label": _group_label(name, group_bns[name]), "bns": group_bns[name],
                       "before": before, "after": after})
    n_before = sum(w["before"] for w in widths)
    n_after = sum(w["after"] for w in widths)
    layers_after = layer_widths(model)
    layers = [{"layer": name, "in_before": b[0], "in_after": layers_after[name][0], "out_before": b[1],
               "out_after": layers_after[name][1]} for name, b in layers_before.items()]
    results.update({
        "str": {"test_acc": soft_acc, "channel_sparsity": report.channel_sparsity, "thresholds": thresholds,
                "history": hist},
        "prune": {"test_acc": pruned_acc, "max_abs_diff": diff, "allowed_abs_diff": 1e-4 * scale,
                  "outputs_equal": equal, "params_before": result.params_before, "params_after": result.params_after,
                  "macs_before": result.macs_before, "macs_after": result.macs_after,
                  "channels_before": n_before, "channels_after": n_after,
                  "kept_to_stay_connected": result.kept_to_stay_connected, "folds": len(result.surgery.folds)},
        "latency_ms": {"batch": config.latency_batch, "repeats": config.latency_repeats,
                       "before_prune": lat_soft, "after_prune": lat_pruned,
                       "unpruned_arch_plain_bn_before": lat_dense_arch_before,
                       "unpruned_arch_plain_bn_after": lat_dense_arch},
        "finetune": {"test_acc": ft_acc, "epochs": config.finetune_epochs, "lr": config.finetune_lr,
                     "history": ft_hist},
        "widths": widths,
        "layers": layers,
    })
    timings["total_s"] = time.perf_counter() - t_start
    results["timings_s"] = timings

    _print_report(console, results)
    title = (f"{data.name}: {config.arch} CNN, STR-BN (adapter bn_gamma, policy str)\n"
             f"channels {n_before} → {n_after}, params {_fmt_ratio(result.params_before, result.params_after)} "
             f"and MACs {_fmt_ratio(result.macs_before, result.macs_after)} fewer; test acc {soft_acc:.1%} soft, "
             f"{pruned_acc:.1%} pruned, {ft_acc:.1%} fine-tuned")
    bars = []  # convs: output channels; the classifier: its input features (its outputs are the classes)
    for row in layers:
        side = "in" if isinstance(model.get_submodule(row["layer"]), nn.Linear) else "out"
        label = row["layer"] + (" (in)" if side == "in" else "")
        bars.append({"label": label, "before": row[f"{side}_before"], "after": row[f"{side}_after"]})
    save_widths_plot(bars, out / "widths.png", title)
    (out / "demo.json").write_text(json.dumps(results, indent=2))
    console.print(f"wrote {out / 'demo.json'} and {out / 'widths.png'} ({timings['total_s']:.1f} s in all)")
    return results


def _print_report(console: Console, r: dict[str, Any]) -> None:
    p, lat = r["prune"], r["latency_ms"]
    t = Table(title="STR-BN: before and after prune")
    for col in ("", "before prune", "after prune", "ratio"):
        t.add_column(col, justify="right")
    t.add_row("test accuracy", f"{r['str']['test_acc']:.2%}", f"{p['test_acc']:.2%}", "")
    t.add_row("params", f"{p['params_before']:,}", f"{p['params_after']:,}",
              _fmt_ratio(p["params_before"], p["params_after"]))
    t.add_row("MACs / image", f"{p['macs_before']:,}", f"{p['macs_after']:,}",
              _fmt_ratio(p["macs_before"], p["macs_after"]))
    t.add_row(f"latency ms (batch {lat['batch']})", f"{lat['before_prune']:.2f}", f"{lat['after_prune']:.2f}",
              _fmt_ratio(lat["before_prune"], lat["after_prune"]))
    t.add_row("  same arch, plain BN", f"{lat['unpruned_arch_plain_bn_after']:.2f}", f"{lat['after_prune']:.2f}",
              _fmt_ratio(lat["unpruned_arch_plain_bn_after"], lat["after_prune"]))
    t.add_row("BN channels", f"{p['channels_before']}", f"{p['channels_after']}",
              f"{1 - p['channels_after'] / max(p['channels_before'], 1):.1%} removed")
    console.print(t)

    w = Table(title="widths per channel group (importance vectors: their BNs)")
    for col, just in (("group", "left"), ("before", "right"), ("after", "right"), ("removed", "right"),
                      ("threshold", "right")):
        w.add_column(col, justify=just)  # type: ignore[arg-type]
    thr = r["str"]["thresholds"]
    for row in r["widths"]:
        th = ", ".join(f"{thr[b]:.3f}" for b in row["bns"] if b in thr)
        w.add_row(row["label"], str(row["before"]), str(row["after"]),
                  f"{1 - row['after'] / max(row['before'], 1):.0%}", th)
    console.print(w)

    lt = Table(title="widths per layer (channels in → out)")
    for col, just in (("layer", "left"), ("in: before → after", "right"), ("out: before → after", "right")):
        lt.add_column(col, justify=just)  # type: ignore[arg-type]
    for row in r["layers"]:
        lt.add_row(row["layer"], f"{row['in_before']} → {row['in_after']}", f"{row['out_before']} → {row['out_after']}")
    console.print(lt)

    a = Table(title="test accuracy")
    a.add_column("model")
    a.add_column("accuracy", justify="right")
    if "dense" in r:
        a.add_row("dense baseline (same recipe, no STR, BN decay = weight decay)", f"{r['dense']['test_acc']:.2%}")
    a.add_row("STR-BN soft model (before prune)", f"{r['str']['test_acc']:.2%}")
    a.add_row("pruned", f"{p['test_acc']:.2%}")
    a.add_row(f"pruned + {r['finetune']['epochs']} epoch(s) fine-tune", f"{r['finetune']['test_acc']:.2%}")
    console.print(a)
    verdict = "[green]equal[/]" if p["outputs_equal"] else "[red]DIFFERENT[/]"
    console.print(f"pruned vs soft outputs on all {r['data']['test']} test images: max |Δ| = {p['max_abs_diff']:.3g} "
                  f"(allowed {p['allowed_abs_diff']:.3g}) → {verdict}")


def config_from_args(args: Any) -> DemoConfig:
    """A ``DemoConfig`` from the CLI's parsed arguments."""
    config = DemoConfig(data=args.data, data_path=Path(args.data_path) if args.data_path else None,
                        out=Path(args.out), seed=args.seed, arch=args.arch, baseline=not args.no_baseline,
                        epochs=args.epochs if args.epochs is not None else DEFAULT_EPOCHS[args.data],
                        threads=args.threads or (1 if args.data == "digits" else torch.get_num_threads()))
    if args.finetune_epochs is not None:
        config.finetune_epochs = args.finetune_epochs
    return quick_config(config) if args.quick else config


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


__all__ = ["DemoConfig", "DemoNet", "load_data", "main", "run_demo"]
