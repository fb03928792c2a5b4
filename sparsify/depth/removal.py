"""Remove residual branches physically: the module that adds ``b + s`` is replaced by one computing ``s``.

``remove_residual_branches(model, branches)`` replaces each affected module by the smallest module that
computes what is left: ``nn.Identity`` (``x + f(x)`` → ``x``), the one child still called (a torchvision
``Bottleneck`` → its ``ReLU``, made out-of-place since it now reads the block's input), else a
``torch.fx.GraphModule`` of the rewritten forward that shares the module's remaining children and parameters.
Exact whenever the removed branches output zeros. All or nothing: every replacement is built before the first
is installed; on an error the model is unchanged.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence

import torch
import torch.fx as fx
from torch import nn

from sparsify._utils import set_submodule
from sparsify.depth.branches import ResidualBranch, branch_of, trace_block
from sparsify.errors import PruneError, SparsifyError

__all__ = ["remove_residual_branches", "without_branches"]


def _out_of_place(node: fx.Node, gm: fx.GraphModule) -> None:
    """Make ``node`` (now reading a tensor others read too) compute out of place."""
    if node.kwargs.get("inplace") is True:
        node.kwargs = {**node.kwargs, "inplace": False}
    elif node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        if getattr(module, "inplace", False) is not True:
            return
        if any(True for _ in module.parameters()) or any(True for _ in module.buffers()):
            raise PruneError(f"{node.target} ({type(module).__name__}) writes in place into the block's input once "
                             "the branch is gone and holds tensors, so it cannot be copied out of place")
        twin = copy.deepcopy(module)
        twin.inplace = False
        name = f"{str(node.target).replace('.', '_')}_out_of_place"
        gm.add_submodule(name, twin)
        node.target = name
    elif node.op == "call_method" and str(node.target).endswith("_"):
        if not hasattr(torch.Tensor, str(node.target)[:-1]):
            raise PruneError(f"{node.format_node()} writes in place into the block's input once the branch is gone "
                             "and has no out-of-place twin")
        node.target = str(node.target)[:-1]
    elif node.op == "call_function" and getattr(node.target, "__name__", "").endswith("_"):
        twin = getattr(torch, node.target.__name__[:-1], None)  # type: ignore[union-attr]
        if twin is None:
            raise PruneError(f"{node.format_node()} writes in place into the block's input once the branch is gone "
                             "and has no out-of-place twin in torch")
        node.target = twin


def _shares_input(s: fx.Node) -> bool:
    return s.op == "placeholder" or len(s.users) > 1


def without_branches(module: nn.Module, adds: Iterable[str]) -> nn.Module:
    """A module computing ``module`` with the residual branches of the addition nodes ``adds`` (names in
    :func:`~sparsify.depth.branches.trace_block`'s trace) removed; ``module`` itself is not changed."""
    gm = trace_block(module)
    graph = gm.graph
    for add_name in adds:
        add = next((n for n in graph.nodes if n.name == add_name), None)
        found = branch_of(add, gm) if add is not None else None
        if found is None:
            raise SparsifyError(f"{type(module).__name__} has no residual addition {add_name!r} (its trace changed "
                                "since residual_branches found it?); find the branches again on this model")
        _, s, inside = found
        users = list(add.users)
        add.replace_all_uses_with(s)
        graph.erase_node(add)
        for node in reversed([n for n in graph.nodes if n in inside]):  # users before their inputs
            graph.erase_node(node)
        if _shares_input(s):
            for user in users:
                _out_of_place(user, gm)
    graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    gm.train(module.training)
    return _simplest(gm)


def _simplest(gm: fx.GraphModule) -> nn.Module:
    """``nn.Identity`` or the one module still called where the rewritten forward is just that, else ``gm``."""
    nodes = list(gm.graph.nodes)
    inputs = [n for n in nodes if n.op == "placeholder"]
    output = nodes[-1]
    body = [n for n in nodes if n.op not in ("placeholder", "output")]
    if len(inputs) != 1 or output.kwargs or len(output.args) != 1:
        return gm
    result = output.args[0]
    if result is inputs[0] and not body:
        return nn.Identity()
    if len(body) == 1 and result is body[0] and body[0].op == "call_module" and body[0].args == (inputs[0],) \
            and not body[0].kwargs:
        return gm.get_submodule(str(body[0].target))
    return gm


def remove_residual_branches(model: nn.Module, branches: Sequence[ResidualBranch]) -> list[str]:
    """Remove ``branches`` (from :func:`~sparsify.depth.branches.residual_branches` on this model) in place;
    returns the names of the modules replaced. See the module docstring."""
    if not isinstance(model, nn.Module):
        raise SparsifyError(f"remove_residual_branches expects an nn.Module, got {type(model).__name__}")
    if isinstance(branches, ResidualBranch) or not all(isinstance(b, ResidualBranch) for b in branches):
        raise SparsifyError("branches must be a list of ResidualBranch (from sparsify.depth.residual_branches)")
    names = [b.name for b in branches]
    if len(set(names)) != len(names):
        raise SparsifyError(f"branches repeat: {sorted({n for n in names if names.count(n) > 1})}; name each once")
    by_module: dict[str, list[str]] = {}
    for b in branches:
        by_module.setdefault(b.module, []).append(b.add)
    registered: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        registered.setdefault(id(module), []).append(name)
    replacements: dict[str, nn.Module] = {}
    for name, adds in by_module.items():
        try:
            module = model.get_submodule(name) if name else None
        except AttributeError:
            module = None
        if module is None:
            raise SparsifyError(f"the model has no submodule {name!r}: these branches were found on another model")
        if len(registered[id(module)]) > 1:
            raise SparsifyError(f"{name!r} is registered under several names ({registered[id(module)]}); removing "
                                "its branch at one would leave the others: give each use its own module")
        try:
            replacements[name] = without_branches(module, adds)
        except SparsifyError:
            raise
        except Exception as exc:
            raise PruneError(f"removing the branches of {name!r} failed and the model was left unchanged: "
                             f"{type(exc).__name__}: {exc}") from exc
    for name, new in replacements.items():
        set_submodule(model, name, new)
    return list(replacements)
