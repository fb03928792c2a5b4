"""CIFAR-10 from the shared JPEG archive, decoded once, kept and augmented on the device.

The augmentation (random crop with 4-pixel zero padding, horizontal flip) is a gather on the
device, so the GPU never waits for the CPU. Decoded arrays are cached as a ``.npz`` next to the
archive's copy (``--cache``) so later runs skip decoding.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from sparsify.cli.demo.data import decode_jpegs, subset

MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)


def load_cifar10(path: str | Path, limit: int | None = None, cache: str | Path | None = None
                 ) -> dict[str, np.ndarray]:
    """uint8 images (N, 3, 32, 32) and labels for both splits; ``limit`` keeps N random images of each."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: put cifar10_jpeg.npz (CIFAR-10, JPEG arrays) there or pass --data")
    cache_file = Path(cache) / f"cifar10_u8_{limit or 'all'}.npz" if cache else None
    if cache_file is not None and cache_file.exists():
        with np.load(cache_file) as z:
            return {k: z[k] for k in z.files}
    with np.load(path, allow_pickle=False) as z:
        out = {}
        for split in ("train", "test"):
            index = subset(len(z[f"{split}_labels"]), limit)  # all, or `limit` at random (sorted by class)
            out[f"{split}_x"] = np.ascontiguousarray(decode_jpegs(z[f"{split}_jpeg"], z[f"{split}_offsets"], index))
            out[f"{split}_y"] = z[f"{split}_labels"][index].astype(np.int64)
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache_file, **out)
    return out


class DeviceLoader:
    """Batches of normalised float images from uint8 data held on ``device``.

    Training batches are reshuffled every epoch, randomly cropped from a 4-pixel zero-padded copy
    and flipped; every batch has exactly ``batch`` images (the remainder is dropped), which CUDA
    graphs need. Batches come out channels_last. With ``world`` > 1 (DDP), every rank draws the
    same global batch and keeps its ``batch / world`` slice, so the ranks together see exactly
    what one process would.
    """

    def __init__(self, x: np.ndarray, y: np.ndarray, batch: int, device: torch.device, train: bool,
                 seed: int = 0, rank: int = 0, world: int = 1) -> None:
        if train and batch % world:
            raise ValueError(f"batch {batch} must be divisible by the number of processes {world}")
        self.rank, self.world = rank, world
        self.x = torch.from_numpy(x).to(device)
        if train:
            self.x = torch.nn.functional.pad(self.x, (4, 4, 4, 4))
        self.y = torch.from_numpy(y).to(device)
        self.batch, self.device, self.train = batch, device, train
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(STD, device=device).view(1, 3, 1, 1) * 255
        self.arange = torch.arange(32, device=device)

    def __len__(self) -> int:
        n = len(self.y)
        return n // self.batch if self.train else -(-n // self.batch)

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        return ((x.float() - self.mean) / self.std).contiguous(memory_format=torch.channels_last)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.y)
        if not self.train:
            for i in range(0, n, self.batch):
                yield self._normalise(self.x[i:i + self.batch]), self.y[i:i + self.batch]
            return
        order = torch.randperm(n, device=self.device, generator=self.generator)
        for i in range(len(self)):
            idx = order[i * self.batch:(i + 1) * self.batch]
            offsets = torch.randint(0, 9, (2, self.batch), device=self.device, generator=self.generator)
            rows = (offsets[0, :, None] + self.arange)[:, :, None]  # (B, 32, 1)
            cols = (offsets[1, :, None] + self.arange)[:, None, :]  # (B, 1, 32)
            crop = self.x[idx[:, None, None], :, rows, cols]  # (B, 32, 32, 3): advanced dims first
            flip = torch.rand(self.batch, device=self.device, generator=self.generator) < 0.5
            crop = torch.where(flip[:, None, None, None], crop.flip(2), crop)
            mine = slice(self.rank * self.batch // self.world, (self.rank + 1) * self.batch // self.world)
            yield self._normalise(crop[mine].permute(0, 3, 1, 2)), self.y[idx][mine]
