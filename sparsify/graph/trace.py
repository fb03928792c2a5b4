"""Trace a model into a torch.fx graph and record the shape of every value.

We use ``torch.fx.symbolic_trace`` with ``torch.nn`` modules kept as leaves: it takes tens of
milliseconds on torchvision models (``torch.export`` takes about a second) and keeps each
``nn.Module`` call as one node, so op rules see modules, not their decomposition. Shapes come from
one real forward pass in eval mode under ``no_grad``; the model's mode and state are restored.
"""

from __future__ import annotations

import contextlib
import io
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch import nn
from torch.nn.utils import parametrize

from sparsify.errors import TraceError
from sparsify.graph.repeated_layers import export_replicated, repeated_layers
from sparsify.registry import TypeRegistry

#: Module types fx keeps as single nodes (class or dotted name; subclasses too).
LEAF_MODULES: TypeRegistry[bool] = TypeRegistry(
    "leaf module registration", "Declare one with sparsify.extend.register_module_type(cls, leaf=True).")
#: Free functions whose calls fx records as single nodes (object or dotted name).
AUTOWRAP_FUNCTIONS: TypeRegistry[Callable[..., Any]] = TypeRegistry(
    "autowrap registration", "Declare one with sparsify.extend.register_autowrap_function(fn).")
#: Called with the model before torch.export traces it (integrations register their output types as pytrees).
EXPORT_HOOKS: list[Callable[[nn.Module], None]] = []


def register_export_hook(fn: Callable[[nn.Module], None]) -> None:
    """Call ``fn(model)`` before torch.export traces a model (e.g. to register output types as pytree nodes)."""
    if fn not in EXPORT_HOOKS:
        EXPORT_HOOKS.append(fn)


def register_leaf_module(cls: type[nn.Module] | str) -> type[nn.Module] | str:
    """Keep modules of ``cls`` (a class or dotted name) as single graph nodes instead of tracing through them.

    Use it for modules that fx cannot trace (data-dependent control flow); the module then needs an
    op rule or its channels are treated as a barrier: ``sparsify.extend.register_module_type(cls,
    leaf=True, rule=fn)`` does both. Usable as a decorator.
    """
    if not isinstance(cls, str) and not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"register_leaf_module: cls must be an nn.Module class or a dotted name, got {cls!r}.")
    LEAF_MODULES.register(cls, True)
    return cls


def register_autowrap_function(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Record calls of the free function ``fn`` as single graph nodes."""
    if not callable(fn):
        raise TypeError(f"register_autowrap_function: fn must be a function, got {fn!r}.")
    AUTOWRAP_FUNCTIONS.register(fn, fn)
    return fn


@dataclass(frozen=True)
class TensorInfo:
    """Shape, dtype and device of a traced tensor value."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device

    @property
    def ndim(self) -> int:
        return len(self.shape)


@dataclass
class TracedModel:
    """A model, its fx graph and the example value of every node (tensors as ``TensorInfo``)."""

    model: nn.Module
    graph_module: fx.GraphModule
    values: dict[str, Any]
    inputs: list[Any]

    @property
    def graph(self) -> fx.Graph:
        return self.graph_module.graph


class _Tracer(fx.Tracer):
    def __init__(self) -> None:
        functions = [fn for _, fn in AUTOWRAP_FUNCTIONS.items()]
        super().__init__(autowrap_functions=tuple(functions))
        for fn in functions:  # also calls written through their module (nn.utils.rnn.pack_padded_sequence)
            module = sys.modules.get(getattr(fn, "__module__", None) or "")
            if module is not None and module not in self._autowrap_search:
                self._autowrap_search.append(module)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if LEAF_MODULES.find(type(m)):
            return True
        if parametrize.is_parametrized(m):  # judge by the class parametrize derived from
            base = type(m).__bases__[0]
            return base.__module__.startswith(("torch.nn", "torch.ao.nn")) and not issubclass(base, nn.Sequential)
        return super().is_leaf_module(m, module_qualified_name)


def _has_tensor(value: Any) -> bool:
    return isinstance(value, torch.Tensor) or (isinstance(value, (tuple, list)) and any(map(_has_tensor, value)))


def _describe(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return TensorInfo(tuple(value.shape), value.dtype, value.device)
    if isinstance(value, (tuple, list)) and _has_tensor(value):  # nested: an LSTM's (PackedSequence, (h, c))
        return type(value)(_describe(v) for v in value) if type(value) in (tuple, list) else tuple(
            _describe(v) for v in value
        )
    return value


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm, garbage_collect_values=True)
        self.values: dict[str, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        self.current = n  # named in the error if this node fails
        out = super().run_node(n)
        self.values[n.name] = _describe(out)
        return out

    def where(self) -> str:
        """The node that was running, and the shapes of its tensor inputs, for an error message."""
        n = getattr(self, "current", None)
        if n is None:
            return ""
        target = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", str(n.target))
        shapes = [tuple(v.shape) for a in n.all_input_nodes if isinstance(v := self.values.get(a.name), TensorInfo)]
        return f" (at {n.op} {target!r}{f' with input shapes {shapes}' if shapes else ''})"


def as_args(example_inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Normalise example inputs (a tensor, a tuple of positional inputs, or a dict of keywords)."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, Mapping):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    raise TraceError(
        f"example_inputs must be a tensor, a tuple of positional inputs or a dict of keyword inputs, "
        f"not {type(example_inputs).__name__}."
    )


def trace(model: nn.Module, example_inputs: Any) -> TracedModel:
    """Trace ``model`` with fx and record every node's example value.

    The model is left exactly as it was: its train/eval mode, parameters and buffers.
    """
    if not isinstance(model, nn.Module):
        raise TraceError(f"expected an nn.Module, got {type(model).__name__}: pass the model itself (a plain "
                         "function: wrap it in an nn.Module whose forward calls it)")
    check_supported_model(model)
    args, kwargs = as_args(example_inputs)
    devices = sorted({str(t.device) for t in [*model.parameters(), *model.buffers()]})
    if len(devices) > 1:
        raise TraceError(f"the model's parameters and buffers are on several devices ({', '.join(devices)}); "
                         "sparsify prunes a model where it lives, on one device. Move it first: model.to(device).")
    fx_failed: Exception | None = None
    replicated = False
    try:
        graph = _Tracer().trace(model, concrete_args=None)
        for node in graph.nodes:  # fx's code for a wrapped torch function (pack_padded_sequence) would register
            if getattr(node.target, "__module__", "").startswith("torch."):  # a wrap() that breaks later traces
                node.meta.pop("is_wrapped", None)
        gm = fx.GraphModule(model, graph, class_name=type(model).__name__)
    except Exception as fx_exc:  # fx raises many kinds of errors
        fx_failed = fx_exc
        try:
            gm, replicated = _export_model(model, args, kwargs)
        except Exception as export_exc:
            raise TraceError(
                f"could not trace {type(model).__name__}. torch.fx: {type(fx_exc).__name__}: {fx_exc}\n"
                f"torch.export: {type(export_exc).__name__}: {str(export_exc)[:500]}\n"
                "Fix: mark the offending submodule as a leaf with sparsify.extend.register_leaf_module(cls) "
                "(and give it an op rule), or remove data-dependent Python control flow from forward()."
            ) from fx_exc
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    by_fx = not isinstance(fx_failed, Exception)
    flat, defaulted = _bind_inputs(placeholders, args, kwargs, check_names=by_fx)
    values, output = _record(model, gm, flat, args, kwargs, defaulted)
    if fx_failed is not None and replicated and not _same_output(model, args, kwargs, output):
        gm = _export(model, args, kwargs)  # the layers were not alike after all: trace them all
        values, _ = _record(model, gm, flat, args, kwargs, defaulted)
    return TracedModel(model, gm, values, flat)


def _export_model(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[fx.GraphModule, bool]:
    """torch.export's graph of ``model``, and whether it was built from two layers replicated (repeated_layers)."""
    path = repeated_layers(model)
    if path is not None:
        try:
            gm = export_replicated(model, path, lambda m: _export(m, args, kwargs))
        except Exception:  # the cut model did not export: the full export below says why
            gm = None
        if gm is not None:
            return gm, True
    return _export(model, args, kwargs), False


def _same_output(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> bool:
    """Whether the model's own forward returns what the traced graph returned (eval mode, no_grad)."""
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            expected = model(*args, **kwargs)
    finally:
        for m, mode in modes.items():
            m.training = mode
    got, want = pytree.tree_leaves(output), pytree.tree_leaves(expected)
    return len(got) == len(want) and all(
        bool(a == b) if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor))
        else a.shape == b.shape and torch.allclose(a, b, rtol=1e-5, atol=1e-6, equal_nan=True)
        for a, b in zip(got, want, strict=True))


def _record(model: nn.Module, gm: fx.GraphModule, flat: list[Any], args: tuple[Any, ...], kwargs: dict[str, Any],
            defaulted: list[str]) -> tuple[dict[str, Any], Any]:
    """Run ``gm`` on the example inputs (eval mode, no_grad): every node's value description, and the output."""
    modes = {m: m.training for m in model.modules()}
    recorder = _Recorder(gm)
    try:
        model.eval()
        with torch.no_grad():
            output = recorder.run(*flat)
            values = recorder.values
    except Exception as exc:
        hint = ""
        if defaulted:
            hint = (f"\nforward()'s {', '.join(repr(d) for d in defaulted)} got no value from example_inputs, so "
                    "the default was used, but torch.fx traced forward() as if every argument were given (a tensor). "
                    "Pass them in example_inputs (a dict {name: tensor}), or wrap the model in a module whose "
                    "forward takes only the inputs you give.")
        raise TraceError(
            f"running the traced graph on example_inputs failed{recorder.where()}: {type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}{hint}\n"
            f"example_inputs: {_shapes(args, kwargs)}. Fix: pass example_inputs that the model's forward() accepts "
            "(right shape, dtype, device)."
        ) from exc
    finally:
        for m, mode in modes.items():
            m.training = mode
    return values, output


def _wrapper_fix(module: nn.Module) -> str | None:
    """How to get at the plain model inside a wrapper module, or None if ``module`` is no wrapper."""
    if isinstance(module, torch.jit.ScriptModule):
        return ("a TorchScript module has no Python forward to trace or prune: sparsify the eager model, "
                "then torch.jit.script/trace the pruned one")
    if isinstance(module, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        return (f"use the wrapped model, `.module`, and wrap the pruned model again"
                f"{' (see sparsify.distributed)' if isinstance(module, nn.parallel.DistributedDataParallel) else ''}")
    if type(module).__name__ == "OptimizedModule" and hasattr(module, "_orig_mod"):
        return "use the model torch.compile wrapped, `._orig_mod`, and call torch.compile on the pruned model"
    return None


_QUANTIZED = ("torch.ao.nn.quantized", "torch.nn.quantized", "torch.ao.nn.intrinsic.quantized")


def check_supported_model(model: nn.Module) -> None:
    """Raise TraceError if ``model`` or a submodule is a wrapper (DataParallel, DistributedDataParallel,
    ``torch.compile``'s OptimizedModule, TorchScript) that hides the model's layers, or a quantized
    module (packed weights that cannot be sliced); say how to get at the float model."""
    for name, module in model.named_modules():
        where = f"submodule {name!r} of {type(model).__name__}" if name else "the model"
        fix = _wrapper_fix(module)
        if fix is not None:
            raise TraceError(f"{where} is {type(module).__name__}, a wrapper that sparsify cannot see through: {fix}.")
        if type(module).__module__.startswith(_QUANTIZED) or any(
                t.is_quantized for t in (*module._parameters.values(), *module._buffers.values()) if t is not None):
            raise TraceError(f"{where} is quantized ({type(module).__module__}.{type(module).__name__}); its packed "
                             "weights cannot be sliced. Sparsify the float model, then quantize the pruned one.")


def _export(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> fx.GraphModule:
    """The ATen-level graph of ``torch.export`` (used where fx fails, e.g. Hugging Face models),
    with parameters as ``get_attr`` nodes named as in ``model`` and shared with it."""
    for hook in EXPORT_HOOKS:
        hook(model)
    modes = {m: m.training for m in model.modules()}
    captured = io.StringIO()
    try:
        model.eval()
        with contextlib.redirect_stderr(captured):  # torch.export prints a failed partial graph once per wrapper
            gm = torch.export.export(model, args, kwargs=kwargs, strict=False).module()
    except Exception as exc:
        partial = str(getattr(exc, "partial_fx_graph", "") or "")
        text = captured.getvalue()
        sys.stderr.write(text.replace(partial + "\n", "").replace(partial, "") if partial else text)
        raise
    else:
        sys.stderr.write(captured.getvalue())
    finally:
        for m, mode in modes.items():
            m.training = mode
    own = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers(remove_duplicate=False))
    for node in gm.graph.nodes:
        if node.op == "get_attr" and str(node.target) in own:
            module_name, _, attr = str(node.target).rpartition(".")
            holder = gm.get_submodule(module_name) if module_name else gm
            tensor = own[str(node.target)]
            if isinstance(tensor, nn.Parameter):
                holder._parameters[attr] = tensor
            else:
                holder._buffers[attr] = tensor
    return gm


def _shapes(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    def one(v: Any) -> str:
        return f"{tuple(v.shape)} {str(v.dtype).removeprefix('torch.')}" if isinstance(v, torch.Tensor) else \
            type(v).__name__
    return ", ".join([one(a) for a in args] + [f"{k}={one(v)}" for k, v in kwargs.items()]) or "none"


def _bind_inputs(placeholders: list[fx.Node], args: tuple[Any, ...], kwargs: dict[str, Any], *,
                 check_names: bool = False) -> tuple[list[Any], list[str]]:
    """The value of every placeholder, and the names that fell back to forward()'s defaults.

    Shapes come from one real forward pass of the graph (``_Recorder``) in eval mode. Measured
    alternatives were slower on the CPU for torchvision models: fake tensors (about 4×) and meta
    tensors (about 1.2×). With ``check_names`` (an fx graph, whose placeholders are forward()'s
    parameters) surplus positional inputs and unknown keywords are refused.
    """
    names = [(n.target if isinstance(n.target, str) else n.name) for n in placeholders]
    if check_names and not any(n.startswith("*") for n in names):
        signature = f"forward({', '.join(names)})"
        if len(args) > len(names):
            raise TraceError(f"example_inputs give {len(args)} positional inputs, but {signature} takes "
                             f"{len(names)}; drop the extra inputs.")
        unknown = [k for k in kwargs if k not in names]
        if unknown:
            raise TraceError(f"example_inputs give keyword {unknown[0]!r}, which {signature} does not take; "
                             "use its parameter names as the dict keys.")
        twice = [k for k in kwargs if k in names[:len(args)]]
        if twice:
            raise TraceError(f"example_inputs give {twice[0]!r} both positionally and as a keyword; give it once.")
    values: list[Any] = []
    defaulted: list[str] = []
    for i, node in enumerate(placeholders):
        name = names[i].lstrip("*")
        if i < len(args):
            values.append(args[i])
        elif name in kwargs:
            values.append(kwargs[name])
        elif node.args:
            values.append(node.args[0])
            defaulted.append(name)
        else:
            raise TraceError(
                f"example_inputs give no value for the model input {name!r}; pass it positionally "
                "or as a keyword in a dict."
            )
    return values, defaulted
