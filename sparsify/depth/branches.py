"""Find the residual branches of any network: the ``f(x)`` of a block's ``x + f(x)``, wherever a module adds one.

Each module's own forward is traced with :mod:`torch.fx`, its children as leaves, so every addition belongs to
the module whose code performs it (a torchvision ``Bottleneck``'s ``out += identity``, a ViT ``EncoderBlock``'s
two, a ConvNeXt ``CNBlock``'s). An operand ``b`` of an addition ``b + s`` is a *residual branch* when:

* ``b`` is used by the addition only, and the nodes computing it (those whose every use leads to ``b`` only)
  read nothing outside themselves but ``s`` or what ``s`` was computed from, and read something (a parameter
  alone, a positional embedding, is not a branch);
* none of them writes in place into a tensor outside the branch (removing it would change ``s``);
* ``b`` and ``s`` have the same shape on the example inputs (no broadcasting), and the traced forward
  reproduces the module's output there.

Then ``b + s`` may become ``s``: exact whenever ``b`` is zero (:mod:`sparsify.depth.removal`). Where both
operands qualify (a downsample block: ``main(x) + downsample(x)``) the one computed by more nodes is the
branch; a tie is no branch. Not searched: the root module (the object itself can't be swapped), ``torch.nn``'s
own layers, containers, modules the example never calls and modules fx cannot trace (value-dependent control
flow): :func:`untraced_modules` lists the last.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from sparsify._utils import evaluating
from sparsify.depth.calls import ModuleCall, record_calls
from sparsify.errors import SparsifyError
from sparsify.graph.fusable import addition_operands

__all__ = ["ResidualBranch", "residual_branches", "trace_block", "untraced_modules"]

@dataclass(frozen=True)
class ResidualBranch:
    """One removable residual branch: the module whose forward adds it, the addition's node name in that
    module's trace (:func:`trace_block`), the branch's output node and the children only the branch calls."""

    module: str
    add: str
    output: str
    layers: tuple[str, ...]

    @property
    def name(self) -> str:
        """``"layer1.0:add"``: unique in a model."""
        return f"{self.module}:{self.add}"


class _ChildrenAsLeaves(fx.Tracer):
    """Traces one module's own code: every submodule it calls is a leaf."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True


def trace_block(module: nn.Module) -> fx.GraphModule:
    """The fx trace of ``module``'s own forward (its children as leaves); raises what fx raises."""
    graph = _ChildrenAsLeaves().trace(module)
    return fx.GraphModule(module, graph, class_name=type(module).__name__)


def _searchable(name: str, module: nn.Module) -> bool:
    if not name or isinstance(module, (nn.Sequential, nn.ModuleList, nn.ModuleDict, fx.GraphModule)):
        return False
    return not type(module).__module__.startswith("torch.nn")


def exclusive_nodes(out: fx.Node) -> set[fx.Node]:
    """``out`` and every node all of whose uses lead to ``out`` alone (placeholders excluded)."""
    inside = {out}
    nodes = list(out.graph.nodes)
    for node in reversed(nodes[:nodes.index(out)]):
        if node.op in ("placeholder", "output") or not node.users:
            continue
        unused = {u for u in node.users if _unused_item(u)}  # ``y, _ = f(x)``: the ``_`` goes with f
        if unused != set(node.users) and all(u in inside or u in unused for u in node.users):
            inside |= {node, *unused}
    return inside


def _unused_item(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is operator.getitem and not node.users


def _ancestors(node: fx.Node) -> set[fx.Node]:
    seen, todo = {node}, [node]
    while todo:
        for a in todo.pop().all_input_nodes:
            if a not in seen:
                seen.add(a)
                todo.append(a)
    return seen


def _writes_in_place(node: fx.Node, gm: fx.GraphModule) -> bool:
    if node.kwargs.get("inplace") is True:
        return True
    if node.op == "call_module":
        return getattr(gm.get_submodule(str(node.target)), "inplace", False) is True
    if node.op == "call_method":
        return str(node.target).endswith("_")
    name = getattr(node.target, "__name__", "")
    return node.op == "call_function" and name.endswith("_") and not name.startswith("_")


def _compute(nodes: set[fx.Node]) -> int:
    return sum(n.op in ("call_module", "call_function", "call_method") for n in nodes)


def branch_of(add: fx.Node, gm: fx.GraphModule) -> tuple[fx.Node, fx.Node, set[fx.Node]] | None:
    """``(branch output, skip, branch nodes)`` of a residual addition node (module docstring), else None."""
    operands = addition_operands(add)
    if operands is None or operands[0] is operands[1]:
        return None
    found = []
    for b, s in (operands, operands[::-1]):
        if len(b.users) != 1:  # read elsewhere too: the stream, not a branch
            continue
        inside = exclusive_nodes(b)
        external = {a for n in inside for a in n.all_input_nodes if a not in inside}
        if not external or not external <= _ancestors(s) or _compute(inside) == 0:
            continue
        if any(_writes_in_place(n, gm) and any(a in external for a in n.all_input_nodes) for n in inside):
            continue
        found.append((b, s, inside))
    if len(found) == 2:
        sizes = [_compute(f[2]) for f in found]
        if sizes[0] == sizes[1]:
            return None
        found = [found[0] if sizes[0] > sizes[1] else found[1]]
    return found[0] if found else None


def _shapes(gm: fx.GraphModule, call: ModuleCall) -> dict[str, Any] | None:
    """Each node's output shape on the recorded call, or None if the trace does not reproduce the module."""
    shapes: dict[str, Any] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            value = super().run_node(n)
            shapes[n.name] = tuple(value.shape) if isinstance(value, torch.Tensor) else None
            return value

    try:
        args = call.positional(gm)
        with torch.no_grad():
            out = Recorder(gm).run(*args)
    except Exception:  # a trace that cannot run on the real input is not searched
        return None
    if not _same(out, call.output):
        return None
    return shapes


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and bool(torch.equal(a, b) or torch.allclose(a, b, rtol=1e-5, atol=1e-6))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)) and len(a) == len(b):
        return all(_same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


def _search(model: nn.Module, example_inputs: Any) -> tuple[list[ResidualBranch], list[str]]:
    if not isinstance(model, nn.Module):
        raise SparsifyError(f"residual_branches expects an nn.Module, got {type(model).__name__}")
    candidates = {n: m for n, m in model.named_modules() if _searchable(n, m)}
    calls = record_calls(model, example_inputs, candidates)
    branches: list[ResidualBranch] = []
    untraced: list[str] = []
    with evaluating(model):  # the traces run on the recorded inputs: BatchNorm statistics stay untouched
        for name, call in calls.items():
            _search_module(name, candidates[name], call, branches, untraced)
    return branches, untraced


def _search_module(name: str, module: nn.Module, call: ModuleCall, branches: list[ResidualBranch],
                   untraced: list[str]) -> None:
    try:
        gm = trace_block(module)
    except Exception:  # fx cannot trace this forward: not searched, listed
        untraced.append(name)
        return
    adds = [n for n in gm.graph.nodes if addition_operands(n) is not None]
    if not adds:
        return
    shapes = _shapes(gm, call)
    if shapes is None:
        untraced.append(name)
        return
    for add in adds:
        found = branch_of(add, gm)
        if found is None:
            continue
        b, s, inside = found
        if shapes.get(b.name) is None or shapes.get(b.name) != shapes.get(s.name):
            continue
        layers = sorted({str(n.target) for n in inside if n.op == "call_module"} -
                        {str(n.target) for n in gm.graph.nodes if n.op == "call_module" and n not in inside})
        branches.append(ResidualBranch(name, add.name, b.name, tuple(layers)))


def residual_branches(model: nn.Module, example_inputs: Any) -> list[ResidualBranch]:
    """Every residual branch of ``model`` (module docstring), in the order the example calls their modules.

    ``example_inputs``: a tensor or tuple of positional inputs. The model runs once, in eval mode and without
    gradients (its mode is put back); nothing else about it changes.
    """
    return _search(model, example_inputs)[0]


def untraced_modules(model: nn.Module, example_inputs: Any) -> list[str]:
    """Modules whose own forward could not be searched (fx cannot trace it, or its trace differs from it)."""
    return _search(model, example_inputs)[1]
