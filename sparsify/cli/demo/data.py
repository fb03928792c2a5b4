"""The demo's data sets: scikit-learn's bundled digits, Fashion-MNIST (IDX files), CIFAR-10 (a JPEG ``.npz``).

Only digits needs no file; the others are read from the path given with ``--data-path``.
"""

from __future__ import annotations

import gzip
import io
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sparsify.cli.demo.config import DATASETS

__all__ = ["Data", "decode_jpegs", "load_cifar10", "load_data", "load_digits_data", "load_fashion_mnist", "subset"]

FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot"]


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


def _labels(y: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(y.astype(np.int64))


def subset(n: int, limit: int | None, seed: int = 0) -> np.ndarray:
    """Indices of a fixed-seed random subset of ``limit`` of ``n`` items (all, in order, without a limit);
    files sorted by class make a prefix useless."""
    if limit is None or limit >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).permutation(n)[:limit])


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
    return Data("digits", xt, _labels(y_tr), xe, _labels(y_te), [str(c) for c in digits.target_names])


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


def load_fashion_mnist(path: str | Path | None) -> Data:
    """Fashion-MNIST from the folder ``path`` holding its four IDX files (``.gz`` or not), e.g. the one the
    Debian package ``dataset-fashion-mnist`` installs."""
    if path is None or not Path(path).is_dir():
        raise SystemExit("--data fashion-mnist needs --data-path pointing at the folder with the Fashion-MNIST "
                         f"IDX files (got {str(path) if path else 'none'}); the Debian package "
                         "dataset-fashion-mnist installs them")
    root = Path(path)

    def find(stem: str) -> Path:
        for name in (f"{stem}.gz", stem):
            if (root / name).is_file():
                return root / name
        raise SystemExit(f"Fashion-MNIST file {stem}[.gz] not found in {root}; pass --data-path pointing at the "
                         "folder with the four IDX files")

    x_tr = _read_idx(find("train-images-idx3-ubyte"))[:, None].astype(np.float64) / 255.0
    y_tr = _read_idx(find("train-labels-idx1-ubyte"))
    x_te = _read_idx(find("t10k-images-idx3-ubyte"))[:, None].astype(np.float64) / 255.0
    y_te = _read_idx(find("t10k-labels-idx1-ubyte"))
    xt, xe = _normalise(x_tr, x_te)
    return Data("fashion-mnist", xt, _labels(y_tr), xe, _labels(y_te), list(FASHION_MNIST_CLASSES))


def decode_jpegs(blob: np.ndarray, offsets: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """uint8 images (N, 3, 32, 32) (a transposed view) of the JPEGs ``blob[offsets[i]:offsets[i + 1]]``
    for ``i`` in ``indices``."""
    from PIL import Image

    out = np.empty((len(indices), 32, 32, 3), dtype=np.uint8)
    for j, i in enumerate(indices):
        with Image.open(io.BytesIO(blob[offsets[i]:offsets[i + 1]].tobytes())) as im:
            out[j] = np.asarray(im.convert("RGB"))
    return out.transpose(0, 3, 1, 2)


def load_cifar10(path: str | Path | None, train_limit: int | None = None, test_limit: int | None = None) -> Data:
    """CIFAR-10 from the JPEG ``.npz`` (keys ``{train,test}_{jpeg,offsets,labels}``, ``classes``); with a
    limit, only a fixed random subset is decoded."""
    if path is None or not Path(path).is_file():
        raise SystemExit("--data cifar10 needs --data-path pointing at cifar10_jpeg.npz "
                         f"(got {str(path) if path else 'none'})")
    with np.load(path, allow_pickle=False) as z:
        tr = subset(len(z["train_labels"]), train_limit)
        te = subset(len(z["test_labels"]), test_limit)
        x_tr = decode_jpegs(z["train_jpeg"], z["train_offsets"], tr).astype(np.float64) / 255.0
        x_te = decode_jpegs(z["test_jpeg"], z["test_offsets"], te).astype(np.float64) / 255.0
        y_tr, y_te = z["train_labels"][tr], z["test_labels"][te]
        classes = [str(c) for c in z["classes"]]
    xt, xe = _normalise(x_tr, x_te)
    return Data("cifar10", xt, _labels(y_tr), xe, _labels(y_te), classes)


def load_data(name: str, path: str | Path | None = None, train_limit: int | None = None,
              test_limit: int | None = None) -> Data:
    """The data set ``name`` (file or folder ``path`` where it needs one), cut to fixed random subsets of
    ``train_limit``/``test_limit`` images."""
    if name == "digits":
        data = load_digits_data()
    elif name == "fashion-mnist":
        data = load_fashion_mnist(path)
    elif name == "cifar10":
        data = load_cifar10(path, train_limit, test_limit)
    else:
        raise SystemExit(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")
    tr, te = subset(len(data.x_train), train_limit), subset(len(data.x_test), test_limit)
    data.x_train, data.y_train = data.x_train[tr], data.y_train[tr]
    data.x_test, data.y_test = data.x_test[te], data.y_test[te]
    return data
