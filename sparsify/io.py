"""Save a pruned model as its prune record plus weights, and load it back into the original architecture.

``save`` writes ``<path>/model.safetensors`` (the state dict; tensors shared under several names are
stored once and their aliases recorded) and ``<path>/plan.json`` (a ``PruneRecord``: every removal plan
applied, in order; the file keeps its name so saved models stay loadable). ``load`` builds
the unpruned model, replays every prune step by group name, creates the biases that folding created
and loads the weights strictly: the result equals the saved model bit for bit.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from sparsify._utils import owner_of
from sparsify.errors import SparsifyError
from sparsify.graph.channel_graph import build_channel_graph
from sparsify.prune.surgery import PruneReport, prune_channels

WEIGHTS_FILE = "model.safetensors"
RECORD_FILE = "plan.json"  # the name of format version 1
FORMAT_VERSION = 1


class LoadError(SparsifyError):
    """A saved pruned model could not be loaded (missing files, wrong architecture, weights that don't fit)."""


class TensorSpec(BaseModel):
    """Shape and dtype of one example input; ``load`` rebuilds it as zeros (valid token ids too)."""

    model_config = ConfigDict(extra="forbid")
    shape: list[int]
    dtype: str = Field(description="torch dtype name without the 'torch.' prefix, e.g. 'float32', 'int64'")

    def build(self, device: torch.device | str | None = None) -> torch.Tensor:
        return torch.zeros(self.shape, dtype=getattr(torch, self.dtype), device=device)


class InputSpec(BaseModel):
    """Example inputs as given to ``build_channel_graph``: one tensor, positional inputs, or keyword inputs."""

    model_config = ConfigDict(extra="forbid")
    kind: str = Field(description="'tensor', 'tuple' or 'dict'")
    tensors: list[TensorSpec] = Field(default_factory=list)
    names: list[str] = Field(default_factory=list, description="keyword names, for kind 'dict'")

    @classmethod
    def of(cls, example_inputs: Any) -> InputSpec:
        if isinstance(example_inputs, torch.Tensor):
            return cls(kind="tensor", tensors=[_spec(example_inputs, "input")])
        if isinstance(example_inputs, Mapping):
            return cls(kind="dict", names=[str(k) for k in example_inputs],
                       tensors=[_spec(v, str(k)) for k, v in example_inputs.items()])
        if isinstance(example_inputs, (tuple, list)):
            return cls(kind="tuple", tensors=[_spec(v, f"input {i}") for i, v in enumerate(example_inputs)])
        raise SparsifyError(f"example_inputs must be a tensor, a tuple of tensors or a dict of keyword tensors, "
                            f"got {type(example_inputs).__name__}")

    def build(self, device: torch.device | str | None = None) -> Any:
        tensors = [t.build(device) for t in self.tensors]
        if self.kind == "tensor":
            return tensors[0]
        if self.kind == "dict":
            return dict(zip(self.names, tensors, strict=True))
        return tuple(tensors)


class PruneStep(BaseModel):
    """One ``prune_channels`` call: removed structures by group name, and the biases folding created."""

    model_config = ConfigDict(extra="forbid")
    removed: dict[str, list[int]]
    widths: dict[str, int] = Field(default_factory=dict, description="group name → width before the step")
    created_biases: dict[str, list[int]] = Field(default_factory=dict, description="bias name → shape after the step")


class PruneRecord(BaseModel):
    """Everything ``load`` needs besides the weights to turn the original architecture into the pruned one."""

    model_config = ConfigDict(extra="forbid")
    format_version: int = FORMAT_VERSION
    sparsify_version: str
    example_inputs: InputSpec
    steps: list[PruneStep]
    aliases: dict[str, str] = Field(default_factory=dict, description="state-dict key → key its tensor is stored as")

    @classmethod
    def from_reports(cls, reports: Sequence[PruneReport], example_inputs: Any) -> PruneRecord:
        from sparsify._version import __version__

        steps = [PruneStep(removed=dict(r.plan), widths={k: r.widths[k][0] for k in r.plan},
                           created_biases={k: list(v) for k, v in r.created_biases.items()}) for r in reports]
        return cls(sparsify_version=__version__, example_inputs=InputSpec.of(example_inputs), steps=steps)


def _spec(value: Any, what: str) -> TensorSpec:
    if not isinstance(value, torch.Tensor):
        raise SparsifyError(f"{what} is a {type(value).__name__}; save() can only record tensor example inputs")
    return TensorSpec(shape=list(value.shape), dtype=str(value.dtype).removeprefix("torch."))


def _as_reports(reports: Any) -> list[PruneReport]:
    items = reports if isinstance(reports, (list, tuple)) else [reports]
    out = []
    for r in items:
        r = getattr(r, "surgery", r)  # a Sparsifier PruneResult
        if not isinstance(r, PruneReport):
            raise SparsifyError(f"save() takes PruneReports or Sparsifier PruneResults, got {type(r).__name__}")
        out.append(r)
    return out


def _dedupe(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Store each shared tensor once: identical views become aliases; other overlaps are copied."""
    unique: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    storages: set[int] = set()
    for name, t in state.items():
        t = t.detach()
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        key = (ptr, t.storage_offset(), tuple(t.shape), t.stride(), t.dtype, t.device)
        if ptr is not None and key in seen:
            aliases[name] = seen[key]
            continue
        if (ptr is not None and ptr in storages) or not t.is_contiguous():
            t = t.clone(memory_format=torch.contiguous_format)
        elif ptr is not None:
            storages.add(ptr)
            seen[key] = name
        unique[name] = t
    return unique, aliases


def save(model: nn.Module, path: str | Path, reports: Any, example_inputs: Any) -> Path:
    """Write ``<path>/model.safetensors`` and ``<path>/plan.json`` for a pruned ``model``.

    ``reports``: the ``PruneReport`` (or Sparsifier ``PruneResult``) of every prune applied to the model,
    in order. ``example_inputs``: what the channel graphs were built with (only shapes and dtypes are kept).
    Returns the directory.
    """
    from safetensors.torch import save_file

    record = PruneRecord.from_reports(_as_reports(reports), example_inputs)
    tensors, record.aliases = _dedupe(model.state_dict())
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.cpu() if v.device.type != "cpu" else v for k, v in tensors.items()},
              str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    (directory / RECORD_FILE).write_text(record.model_dump_json(indent=1))
    return directory


def load_record(path: str | Path) -> PruneRecord:
    """Read ``<path>/plan.json``."""
    file = Path(path) / RECORD_FILE
    if not file.is_file():
        raise LoadError(f"{file} not found: is {path} a directory written by sparsify.save()?")
    try:
        return PruneRecord.model_validate(json.loads(file.read_text()))
    except ValueError as exc:
        raise LoadError(f"{file} is not a valid sparsify prune record: {exc}") from exc


def _create_bias(model: nn.Module, name: str, shape: Sequence[int]) -> None:
    module, attr = owner_of(model, name)
    if getattr(module, attr, None) is not None:
        raise LoadError(f"the prune record says folding created '{name}', but the model built by build_fn already "
                        "has it: pass the build_fn of the original (unpruned) model")
    ref = next(iter(module.parameters()), None)
    kwargs = {"dtype": ref.dtype, "device": ref.device} if ref is not None else {}
    module.register_parameter(attr, nn.Parameter(torch.zeros(tuple(shape), **kwargs)))


def _replay(model: nn.Module, record: PruneRecord, device: torch.device | str | None) -> None:
    for i, step in enumerate(record.steps):
        try:
            cg = build_channel_graph(model, record.example_inputs.build(device))
        except SparsifyError as exc:
            raise LoadError(f"step {i + 1}: the model from build_fn does not accept the recorded example inputs "
                            f"({exc}); pass the build_fn that builds the original, unpruned architecture") from exc
        widths = {g.name: g.width for g in cg.groups}
        for name, removed in step.removed.items():
            if name not in widths:
                raise LoadError(f"step {i + 1}: channel group '{name}' of the record is not in the model built by "
                                f"build_fn (it has {sorted(widths)[:10]} …): pass the build_fn that builds the "
                                "original, unpruned architecture")
            saved = step.widths.get(name, widths[name])
            if widths[name] != saved or (removed and max(removed) >= widths[name]):
                raise LoadError(f"step {i + 1}: channel group '{name}' has width {widths[name]} in the model built "
                                f"by build_fn but had width {saved} when it was pruned: pass the build_fn that "
                                "builds the original, unpruned architecture")
        prune_channels(cg, step.removed, fold_constants=False, allow_inexact=True)
        for name, shape in step.created_biases.items():
            _create_bias(model, name, shape)


def _check_fits(model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    expected = model.state_dict()
    for name, t in expected.items():
        if name not in weights:
            raise LoadError(f"the saved weights lack '{name}', which the replayed model has")
        w = weights[name]
        if w.shape != t.shape or w.dtype != t.dtype:
            raise LoadError(f"'{name}' is {tuple(w.shape)} {w.dtype} in the saved weights but "
                            f"{tuple(t.shape)} {t.dtype} after replaying the record: the weights do not belong to "
                            "this record, or build_fn builds another architecture or dtype")
    extra = sorted(set(weights) - set(expected))
    if extra:
        raise LoadError(f"the saved weights have '{extra[0]}', which the replayed model lacks")


def load(build_fn: Callable[[], nn.Module], path: str | Path, *, device: torch.device | str | None = None
         ) -> nn.Module:
    """Rebuild a model saved by ``save``: ``build_fn()`` must return the original, unpruned architecture
    (any weights); its prune record is replayed on it and the saved weights loaded strictly."""
    from safetensors.torch import load_file

    record = load_record(path)
    weights_file = Path(path) / WEIGHTS_FILE
    if not weights_file.is_file():
        raise LoadError(f"{weights_file} not found: is {path} a directory written by sparsify.save()?")
    model = build_fn()
    if device is not None:
        model.to(device)
    else:
        device = next((t.device for t in [*model.parameters(), *model.buffers()]), None)
    _replay(model, record, device)
    weights = load_file(str(weights_file), device=str(device) if device is not None else "cpu")
    for alias, target in record.aliases.items():
        if target not in weights:
            raise LoadError(f"'{alias}' is recorded as an alias of '{target}', which the saved weights lack")
        weights[alias] = weights[target]
    _check_fits(model, weights)
    model.load_state_dict(weights, strict=True)
    return model
