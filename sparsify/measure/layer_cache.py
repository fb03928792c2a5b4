"""Layer timings kept on disk, one JSON file per card, software and setting, so a model is timed once per machine.

The file is named by a hash of its setting: the device's name (``torch.cuda.get_device_name``, or the CPU's),
torch, CUDA and cuDNN versions, dtype, batch, memory format and how layers are timed; a different card or
a torch upgrade gets a new file. The folder is ``$SPARSIFY_CACHE_DIR``, else ``$XDG_CACHE_HOME/sparsify``,
else ``~/.cache/sparsify`` (``latency/`` inside it). Entries map a layer configuration (its signature, as
``repr``) to milliseconds.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["LayerTimingCache", "cache_dir", "device_name"]


def cache_dir() -> Path:
    """Where sparsify keeps its caches (see the module docstring)."""
    if os.environ.get("SPARSIFY_CACHE_DIR"):
        return Path(os.environ["SPARSIFY_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "sparsify"


def device_name(device: torch.device) -> str:
    """The card's name on CUDA, the processor's elsewhere."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or device.type


def software() -> dict[str, Any]:
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {"torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": cudnn}


class LayerTimingCache:
    """Layer timings for one setting, read from and written to a JSON file.

    ``setting`` (plain data: dtype, batch, timing options) is completed with the device's name and the
    software versions; ``path`` overrides the file (else one under :func:`cache_dir`)."""

    def __init__(self, device: torch.device, setting: dict[str, Any], path: str | os.PathLike | None = None) -> None:
        self.setting = {"device": device_name(device), **software(), **setting}
        digest = hashlib.sha256(json.dumps(self.setting, sort_keys=True, default=str).encode()).hexdigest()[:16]
        self.path = Path(path) if path is not None else cache_dir() / "latency" / f"{digest}.json"
        self.entries: dict[str, float] = {}
        self.dirty = False
        if self.path.is_file():
            try:
                data = json.loads(self.path.read_text())
            except (OSError, ValueError):
                data = {}
            if isinstance(data, dict) and data.get("setting") == json.loads(json.dumps(self.setting, default=str)):
                self.entries = {str(k): float(v) for k, v in data.get("timings", {}).items()}

    def get(self, signature: tuple) -> float | None:
        return self.entries.get(repr(signature))

    def put(self, signature: tuple, ms: float) -> None:
        self.entries[repr(signature)] = float(ms)
        self.dirty = True

    def save(self) -> None:
        """Write the file (atomically: a temporary file renamed over it) if anything was added."""
        if not self.dirty:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"setting": self.setting, "timings": self.entries}, indent=1, sort_keys=True, default=str)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, self.path)
        self.dirty = False
