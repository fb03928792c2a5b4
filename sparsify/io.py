"""Save a pruned model as its prune record plus weights, and load it back into the original architecture.

``save`` writes ``<path>/model.safetensors`` (the state dict; tensors shared under several names are
stored once and their aliases recorded) and ``<path>/plan.json`` (a ``PruneRecord``: every removal plan
applied, in order; the file keeps its name so saved models stay loadable). ``load`` builds
the unpruned model, replays every prune step by group name, creates the biases that folding created
and loads the weights strictly: the result equals the saved model bit for bit.

``save`` refuses what could not be loaded back: a model with live Sparsifier parametrizations
(prune or remove them first), reports that do not match the prunes this process applied to the model
or the widths of its channel groups, and (with ``build_fn=``) reports that do not replay the original
architecture to the model's shapes. The record holds a sha256 of every stored tensor; ``load`` verifies
them and raises ``LoadError`` naming the tensor that differs. Records written before checksums existed
(no ``checksums`` entry) still load, without that verification.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, StrictInt
from torch import nn
from torch.nn.utils import parametrize

from sparsify._utils import owner_of
from sparsify.errors import SparsifyError
from sparsify.graph.channel_graph import build_channel_graph
from sparsify.prune.surgery import PRUNE_HISTORY, PruneReport, prune_channels

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
    removed: dict[str, list[StrictInt]]
    widths: dict[str, StrictInt] = Field(default_factory=dict, description="group name → width before the step")
    created_biases: dict[str, list[StrictInt]] = Field(default_factory=dict,
                                                       description="bias name → shape after the step")


class PruneRecord(BaseModel):
    """Everything ``load`` needs besides the weights to turn the original architecture into the pruned one."""

    model_config = ConfigDict(extra="forbid")
    format_version: int = FORMAT_VERSION
    sparsify_version: str
    example_inputs: InputSpec
    steps: list[PruneStep]
    aliases: dict[str, str] = Field(default_factory=dict, description="state-dict key → key its tensor is stored as")
    checksums: dict[str, str] = Field(default_factory=dict, description="stored tensor → sha256 of its bytes; empty "
                                      "in records written before checksums (then not verified)")

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


def _as_reports(model: nn.Module, reports: Any) -> list[PruneReport]:
    if reports is None:
        return list(PRUNE_HISTORY.get(model, []))
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


def save(model: nn.Module, path: str | Path, reports: Any, example_inputs: Any, *,
         build_fn: Callable[[], nn.Module] | None = None) -> Path:
    """Write ``<path>/model.safetensors`` and ``<path>/plan.json`` for a pruned ``model``.

    ``reports``: the ``PruneReport`` (or Sparsifier ``PruneResult``) of every prune applied to the model,
    in order; ``None``: the prunes this process applied to it (``prune_channels``, ``Sparsifier.prune``,
    ``load``). ``example_inputs``: what the channel graphs were built with (only shapes and dtypes are kept).
    ``build_fn`` (optional): builds the original, unpruned architecture; the record is then replayed on a
    meta-device copy and must give the model's exact shapes. Nothing is written unless every check passes.
    Returns the directory.
    """
    from safetensors.torch import save_file

    if not isinstance(model, nn.Module):
        raise SparsifyError(f"save() takes the pruned nn.Module first, got {type(model).__name__}")
    _check_saveable(model)
    report_list = _as_reports(model, reports)
    _check_history(model, report_list)
    record = PruneRecord.from_reports(report_list, example_inputs)
    _check_widths(model, record, example_inputs)
    if build_fn is not None:
        _check_replays(model, record, build_fn)
    tensors, record.aliases = _dedupe(model.state_dict())
    tensors = {k: v.cpu() if v.device.type != "cpu" else v for k, v in tensors.items()}
    record.checksums = {k: _sha256(v) for k, v in tensors.items()}
    directory = Path(path)
    if directory.exists() and not directory.is_dir():
        raise SparsifyError(f"save(): {directory} is a file; give a directory path (it is created if missing)")
    directory.mkdir(parents=True, exist_ok=True)
    weights_tmp, record_tmp = directory / f".{WEIGHTS_FILE}.tmp", directory / f".{RECORD_FILE}.tmp"
    try:  # both files are written aside and moved into place only once both exist
        save_file(tensors, str(weights_tmp), metadata={"format": "pt"})
        record_tmp.write_text(record.model_dump_json(indent=1))
        os.replace(weights_tmp, directory / WEIGHTS_FILE)
        os.replace(record_tmp, directory / RECORD_FILE)
    finally:
        for tmp in (weights_tmp, record_tmp):
            tmp.unlink(missing_ok=True)
    return directory


def _sha256(t: torch.Tensor) -> str:
    """sha256 of a tensor's bytes (row-major, as safetensors stores them)."""
    flat = t.detach().contiguous().reshape(-1)
    return hashlib.sha256(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"").hexdigest()


def _check_saveable(model: nn.Module) -> None:
    live = [name or "<root>" for name, m in model.named_modules() if parametrize.is_parametrized(m)]
    if live:
        raise SparsifyError(f"save(): {live[:3]} still carry parametrizations (a live Sparsifier's masks); the "
                            "weights would be saved unmasked under other names. Call sparsifier.prune() first (or "
                            "torch.nn.utils.parametrize.remove_parametrizations to drop them), then save")
    meta = [n for n, t in model.state_dict().items() if t.is_meta]
    if meta:
        raise SparsifyError(f"save(): '{meta[0]}' is on the meta device and has no values to save; save a model "
                            "with real weights")


def _same_prune(a: PruneReport, b: PruneReport) -> bool:
    return a is b or (a.plan == b.plan and a.widths == b.widths and a.created_biases == b.created_biases)


def _check_history(model: nn.Module, reports: list[PruneReport]) -> None:
    applied = PRUNE_HISTORY.get(model)
    if applied is None:
        return
    if len(applied) != len(reports) or not all(map(_same_prune, applied, reports)):
        raise SparsifyError(f"save(): this model was pruned {len(applied)} time(s) in this process "
                            f"(prune_channels, Sparsifier.prune or load), but the {len(reports)} report(s) given do "
                            "not match those prunes in order; the file could not be loaded back. Pass every "
                            "PruneReport/PruneResult in order, or reports=None to use the recorded ones")


def _check_widths(model: nn.Module, record: PruneRecord, example_inputs: Any) -> None:
    """The widths the record ends with must be the widths of the model's channel groups."""
    final: dict[str, int] = {}
    for step in record.steps:
        for name, removed in step.removed.items():
            final[name] = step.widths.get(name, final.get(name, 0)) - len(removed)
    if not final:
        return
    try:
        cg = build_channel_graph(model, example_inputs)
    except SparsifyError as exc:
        raise SparsifyError(f"save(): the model does not accept example_inputs ({exc}); pass the inputs its channel "
                            "graph was built with") from exc
    widths = {g.name: g.width for g in cg.groups}
    for name, width in final.items():
        if name in widths and widths[name] != width:
            raise SparsifyError(f"save(): the reports leave channel group '{name}' at width {width}, but the model "
                                f"has {widths[name]}: the reports belong to another model or miss a prune. Pass "
                                "every PruneReport of this model in order (reports=None: the ones recorded)")


def _check_replays(model: nn.Module, record: PruneRecord, build_fn: Callable[[], nn.Module]) -> None:
    """Replay the record on a meta-device copy of ``build_fn()``; its shapes must be the model's."""
    with torch.device("meta"):
        skeleton = _build(build_fn)
    try:
        _replay(skeleton, record, "meta")
    except LoadError as exc:
        raise SparsifyError(f"save(): the reports do not replay on build_fn's architecture: {exc}") from exc
    want, got = model.state_dict(), skeleton.state_dict()
    for name in sorted(set(want) | set(got)):
        a, b = want.get(name), got.get(name)
        if a is None or b is None or tuple(a.shape) != tuple(b.shape):
            raise SparsifyError(f"save(): replaying the reports on build_fn's architecture gives '{name}' "
                                f"{None if b is None else tuple(b.shape)}, but the model has "
                                f"{None if a is None else tuple(a.shape)}; the file could not be loaded back. Pass "
                                "every PruneReport of this model in order")


def _build(build_fn: Any) -> nn.Module:
    if isinstance(build_fn, nn.Module):
        raise SparsifyError(f"build_fn must be a function that builds the original model (e.g. lambda: "
                            f"{type(build_fn).__name__}(...)), not a {type(build_fn).__name__} instance")
    if not callable(build_fn):
        raise SparsifyError(f"build_fn must be a function returning the original nn.Module, got "
                            f"{type(build_fn).__name__}")
    model = build_fn()
    if not isinstance(model, nn.Module):
        raise SparsifyError(f"build_fn() returned {type(model).__name__}, not an nn.Module; it must build the "
                            "original, unpruned model")
    return model


def load_record(path: str | Path) -> PruneRecord:
    """Read ``<path>/plan.json``."""
    if not isinstance(path, (str, Path)):
        raise LoadError(f"path must be a str or Path of a directory written by sparsify.save(), got "
                        f"{type(path).__name__}")
    file = Path(path) / RECORD_FILE
    if not file.is_file():
        raise LoadError(f"{file} not found: is {path} a directory written by sparsify.save()?")
    try:
        data = json.loads(file.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise LoadError(f"{file} is not valid JSON ({exc}); the file is damaged: save the model again") from exc
    version = data.get("format_version") if isinstance(data, dict) else None
    if isinstance(version, int) and version > FORMAT_VERSION:
        raise LoadError(f"{file} has format_version {version}, newer than this sparsify reads ({FORMAT_VERSION}); "
                        "upgrade sparsify")
    try:
        return PruneRecord.model_validate(data)
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
        report = prune_channels(cg, step.removed, fold_constants=False, allow_inexact=True)
        for name, shape in step.created_biases.items():
            _create_bias(model, name, shape)
        report.created_biases = {name: tuple(shape) for name, shape in step.created_biases.items()}


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


def _check_device(device: Any) -> None:
    if device is None or isinstance(device, torch.device):
        return
    try:
        torch.device(device)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise LoadError(f"device={device!r} is not a torch device ({exc}); pass e.g. 'cpu', 'cuda', 'cuda:0' or "
                        "None (where build_fn puts the model)") from None


def load(build_fn: Callable[[], nn.Module], path: str | Path, *, device: torch.device | str | None = None
         ) -> nn.Module:
    """Rebuild a model saved by ``save``: ``build_fn()`` must return the original, unpruned architecture
    (any weights); its prune record is replayed on it and the saved weights loaded strictly."""
    from safetensors.torch import load_file

    _check_device(device)
    record = load_record(path)
    weights_file = Path(path) / WEIGHTS_FILE
    if not weights_file.is_file():
        raise LoadError(f"{weights_file} not found: is {path} a directory written by sparsify.save()?")
    try:
        weights = load_file(str(weights_file))
    except Exception as exc:  # safetensors raises its own error types for damaged headers
        raise LoadError(f"{weights_file} could not be read ({type(exc).__name__}: {exc}); the file is damaged: "
                        "save the model again") from exc
    _verify_checksums(weights, record, weights_file)
    try:
        model = _build(build_fn)
    except SparsifyError as exc:
        raise LoadError(str(exc)) from exc
    if device is not None:
        model.to(device)
    else:
        device = next((t.device for t in [*model.parameters(), *model.buffers()]), None)
    PRUNE_HISTORY.pop(model, None)
    _replay(model, record, device)
    if device is not None and torch.device(device).type != "cpu":
        weights = {k: v.to(device) for k, v in weights.items()}
    for alias, target in record.aliases.items():
        if target not in weights:
            raise LoadError(f"'{alias}' is recorded as an alias of '{target}', which the saved weights lack")
        weights[alias] = weights[target]
    _check_fits(model, weights)
    model.load_state_dict(weights, strict=True)
    return model


def _verify_checksums(weights: dict[str, torch.Tensor], record: PruneRecord, file: Path) -> None:
    if not record.checksums:  # written before checksums were recorded
        return
    if set(weights) != set(record.checksums):
        odd = sorted(set(weights) ^ set(record.checksums))
        raise LoadError(f"{file} and its record disagree on which tensors are stored (e.g. '{odd[0]}'): the two files "
                        "come from different saves; save the model again")
    for name, t in weights.items():
        if _sha256(t) != record.checksums[name]:
            raise LoadError(f"'{name}' in {file} does not match the sha256 recorded when it was saved: the file is "
                            "damaged or was changed; save the model again")
