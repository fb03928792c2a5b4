"""Layout ops (view, reshape, flatten, permute, transpose, squeeze, expand, slicing, shuffles).

A chain of layout ops is analysed as one function from the chain's input to each value that leaves
the chain: the same ops are applied to a tensor of element indices, and each output dim is
classified against the input dims as the same channels (possibly permuted, as in channel
shuffle), a product of input dims (flatten), or new. Splitting one channel dim into several
(e.g. into attention heads) is a barrier for now.
"""

from __future__ import annotations

import operator
from typing import Any

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from sparsify.graph.builder import OpContext
from sparsify.graph.rules.registry import find_rule, register_op_rule
from sparsify.graph.trace import TensorInfo

_SIZE_TAKING = {"view", "reshape", "expand", "unflatten", "repeat", "broadcast_to"}

LAYOUT_FUNCTIONS = (torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.swapaxes,
                    torch.squeeze, torch.unsqueeze, torch.t, torch.movedim, torch.unflatten,
                    torch.broadcast_to, torch.channel_shuffle, torch.nn.functional.channel_shuffle,
                    operator.getitem)
LAYOUT_METHODS = ("view", "reshape", "flatten", "permute", "transpose", "swapaxes", "contiguous",
                  "squeeze", "unsqueeze", "expand", "t", "movedim", "unflatten", "broadcast_to")
LAYOUT_MODULES = (nn.Flatten, nn.Unflatten, nn.ChannelShuffle)


def _is_layout(node: fx.Node, ctx: OpContext) -> bool:
    if node.op == "call_function" and node.target is operator.getitem:
        return isinstance(ctx.traced.values.get(node.args[0].name), TensorInfo) if isinstance(
            node.args[0], fx.Node) else False
    rule = find_rule(node, ctx.traced.graph_module)
    return rule is not None and rule.kind in ("layout", "layout_aten")


def _resolve(ctx: OpContext, arg: Any) -> Any:
    if isinstance(arg, fx.Node):
        v = ctx.traced.values.get(arg.name)
        if isinstance(v, TensorInfo):
            raise _Unsupported(f"a tensor argument ({arg.name}) inside a layout op")
        return v
    if isinstance(arg, slice):
        return slice(_resolve(ctx, arg.start), _resolve(ctx, arg.stop), _resolve(ctx, arg.step))
    if isinstance(arg, (tuple, list)):
        return type(arg)(_resolve(ctx, a) for a in arg)
    if isinstance(arg, dict):
        return {k: _resolve(ctx, v) for k, v in arg.items()}
    return arg


class _Unsupported(Exception):
    pass


def _apply(ctx: OpContext, node: fx.Node, idx: torch.Tensor) -> torch.Tensor:
    rest = [_resolve(ctx, a) for a in node.args[1:]]
    kwargs = {k: _resolve(ctx, v) for k, v in node.kwargs.items()}
    if node.op == "call_method":
        return getattr(idx, str(node.target))(*rest, **kwargs)
    if node.op == "call_function":
        return node.target(idx, *rest, **kwargs)
    module = ctx.traced.graph_module.get_submodule(str(node.target))
    return module(idx)


def _literals(ctx: OpContext, node: fx.Node) -> set[int]:
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    if isinstance(node.target, torch._ops.OpOverload):
        name = node.target.overloadpacket.__name__
    if name not in _SIZE_TAKING:
        return set()
    found: set[int] = set()

    def walk(a: Any) -> None:
        if isinstance(a, bool):
            return
        if isinstance(a, int):
            found.add(a)
        elif isinstance(a, (tuple, list)):
            for b in a:
                walk(b)

    for a in list(node.args[1:]) + list(node.kwargs.values()):
        walk(a)
    return found


def _input_index(ctx: OpContext, node: fx.Node) -> tuple[fx.Node, torch.Tensor, set[int]]:
    """(chain root, index tensor of ``node``'s input elements in the root, size literals on the way)."""
    parent = node.args[0]
    if not isinstance(parent, fx.Node):
        raise _Unsupported("a layout op whose input is not a traced tensor")
    if _is_layout(parent, ctx):
        return _index_tensor(ctx, parent)
    info = ctx.traced.values.get(parent.name)
    if not isinstance(info, TensorInfo):
        raise _Unsupported("a layout op whose input is not a tensor")
    return parent, torch.arange(int(np.prod(info.shape)), dtype=torch.int64).reshape(info.shape), set()


def _index_tensor(ctx: OpContext, node: fx.Node) -> tuple[fx.Node, torch.Tensor, set[int]]:
    """(chain root, index tensor of this node's elements in the root, size literals on the way)."""
    cache = ctx.facts.layout_cache
    if node.name in cache:
        return cache[node.name]
    root, parent_idx, lits = _input_index(ctx, node)
    idx = _apply(ctx, node, parent_idx)
    result = (root, idx, lits | _literals(ctx, node))
    cache[node.name] = result
    return result


def layout(ctx: OpContext) -> None:
    """Analyse the layout chain from its root to this node if this node leaves the chain."""
    node = ctx.node
    if node.target is operator.getitem and not isinstance(ctx.value(node.args[0]), TensorInfo):
        _tuple_element(ctx)
        return
    if ctx.out_info is None:
        return
    if all(_is_layout(u, ctx) for u in node.users):
        if node.users:
            return  # interior of a chain: analysed from its exits
    try:
        root, idx, literals = _index_tensor(ctx, node)
    except _Unsupported as exc:
        ctx.block_all(f"{ctx.describe()}: {exc}")
        return
    except Exception as exc:  # an op that cannot run on an index tensor
        ctx.block_all(f"{ctx.describe()} could not be analysed ({type(exc).__name__}: {exc})")
        return
    _couple_interior_splits(ctx, node, root, literals)
    _classify(ctx, root, idx, literals)


def _coords(in_shape: tuple[int, ...], idx: torch.Tensor) -> list[torch.Tensor]:
    strides = np.cumprod((1, *reversed(in_shape[1:])))[::-1]
    return [(idx // int(strides[i])) % in_shape[i] for i in range(len(in_shape))]


def _varies(g: torch.Tensor, j: int) -> bool:
    t = g.shape[j]
    return t > 1 and bool((g.narrow(j, 1, t - 1) != g.narrow(j, 0, t - 1)).any())


def _shuffle_groups(ctx: OpContext, node: fx.Node) -> int | None:
    """The group count of a channel shuffle op (nn.ChannelShuffle, torch.channel_shuffle), else None."""
    if node.op == "call_module":
        module = ctx.traced.graph_module.get_submodule(str(node.target))
        return module.groups if isinstance(module, nn.ChannelShuffle) else None
    if node.op == "call_function" and node.target is torch.channel_shuffle:
        return int(_resolve(ctx, node.args[1] if len(node.args) > 1 else node.kwargs["groups"]))
    return None


def _couple_interior_splits(ctx: OpContext, exit_node: fx.Node, root: fx.Node, literals: set[int]) -> None:
    """Inside a chain, a channel dim split into (fixed, free) factors and merged back (channel
    shuffle) stays valid after pruning only if channels are removed along the free factor: all
    channels sharing a free coordinate form one structure. A channel shuffle op hides that split
    (groups × channels per group) inside itself, so it is coupled as if written out."""
    node = exit_node
    while isinstance(node, fx.Node) and _is_layout(node, ctx):
        if node is not exit_node:
            _, idx, _ = _index_tensor(ctx, node)
            _couple_split(ctx, root, idx, {j for j, t in enumerate(idx.shape) if t not in literals}, node.name)
        groups = _shuffle_groups(ctx, node)
        if groups:
            _, parent_idx, _ = _input_index(ctx, node)
            split = parent_idx.unflatten(1, (groups, -1))  # (N, groups, channels per group, ...)
            _couple_split(ctx, root, split, set(range(split.ndim)) - {1}, node.name)
        node = node.args[0]


def _couple_split(ctx: OpContext, root: fx.Node, idx: torch.Tensor, free_dims: set[int], where: str) -> None:
    """For each dim of ``root`` spread over several dims of ``idx``, the channels sharing a
    coordinate along the one free (not hard-coded) dim among them are one structure."""
    in_shape = ctx.traced.values[root.name].shape
    for i, g in enumerate(_coords(in_shape, idx)):
        if in_shape[i] <= 1:
            continue
        outs = [j for j in range(idx.ndim) if _varies(g, j)]
        space = ctx.space(root, i)
        if len(outs) == 1 and outs[0] not in free_dims:  # e.g. view(b, groups, c // groups, ...) with groups == c
            ctx.block(space, f"{ctx.describe()}: '{where}' gives dim {i} of '{root.name}' the size "
                             f"{idx.shape[outs[0]]}, a constant in the model's code")
        if len(outs) <= 1:
            continue
        free = [j for j in outs if j in free_dims]
        if len(free) != 1:
            ctx.block(space, f"{ctx.describe()}: dim {i} of '{root.name}' is reshaped into dims "
                             f"{outs} of '{where}' and it is ambiguous which one shrinks")
            continue
        position = torch.arange(idx.shape[free[0]]).reshape(
            [-1 if j == free[0] else 1 for j in range(idx.ndim)]).expand(idx.shape)
        free_coord = np.empty(in_shape[i], dtype=np.int64)
        free_coord[g.reshape(-1).numpy()] = position.reshape(-1).numpy()
        _, first = np.unique(free_coord, return_index=True)
        ctx.pairs(space, space, first[free_coord], np.arange(in_shape[i]))


def _tuple_element(ctx: OpContext) -> None:
    """Element k of a tuple-valued node (chunk, split, a module returning a tuple)."""
    source, k = ctx.node.args
    out = ctx.out_info
    if out is None or not isinstance(k, int):
        if ctx.value(ctx.node) is not None and out is None and isinstance(ctx.value(ctx.node), tuple):
            ctx.block_all(f"{ctx.describe()}: nested tuples are not supported")
        return
    for d in range(out.ndim):
        ctx.same(ctx.space(source, d, element=k), ctx.out(d))


def _classify(ctx: OpContext, root: fx.Node, idx: torch.Tensor, literals: set[int]) -> None:
    in_shape = ctx.traced.values[root.name].shape
    out_shape = tuple(idx.shape)
    coords = _coords(in_shape, idx)
    dep = np.zeros((len(in_shape), len(out_shape)), dtype=bool)
    for i, g in enumerate(coords):
        if in_shape[i] > 1:
            for j in range(len(out_shape)):
                dep[i, j] = _varies(g, j)
    what = ctx.describe()

    def line(i: int, j: int) -> np.ndarray:
        g = coords[i]
        index = [0] * len(out_shape)
        index[j] = slice(None)
        return g[tuple(index)].numpy()

    for j, t in enumerate(out_shape):
        if t <= 1:
            continue
        inputs = [i for i in range(len(in_shape)) if dep[i, j]]
        out_space = ctx.out(j)
        if not inputs:
            ctx.fresh(out_space, f"{what} creates dim {j} (broadcast or new)")
        elif t in literals:
            reason = f"{what} hard-codes the size {t} of dim {j} (a constant in the model's code)"
            ctx.block(out_space, reason)
            for i in inputs:
                ctx.block(ctx.space(root, i), reason)
        elif all(dep[i].sum() == 1 for i in inputs) and len(inputs) == 1 and in_shape[inputs[0]] == t:
            ctx.permute(ctx.space(root, inputs[0]), out_space, line(inputs[0], j))
        elif all(dep[i].sum() == 1 for i in inputs) and int(np.prod([in_shape[i] for i in inputs])) == t:
            ctx.merge(out_space, [ctx.space(root, i) for i in inputs], [line(i, j) for i in inputs])
        else:
            reason = f"{what} mixes or slices dims {inputs} of '{root.name}' into dim {j}"
            ctx.block(out_space, reason)
            for i in inputs:
                ctx.block(ctx.space(root, i), reason)
    for i, s in enumerate(in_shape):
        if s <= 1:
            continue
        outs = np.flatnonzero(dep[i])
        if len(outs) == 0:
            ctx.block(ctx.space(root, i), f"{what} selects from dim {i} of '{root.name}' by a constant index")
        elif len(outs) > 1:
            reason = (f"{what} splits dim {i} of '{root.name}' into dims {outs.tolist()} (e.g. attention "
                      "heads); pruning through such a split is not supported yet")
            ctx.block(ctx.space(root, i), reason)
            for j in outs:
                ctx.block(ctx.out(int(j)), reason)


register_op_rule("layout", layout, functions=LAYOUT_FUNCTIONS, methods=LAYOUT_METHODS,
                 modules=LAYOUT_MODULES)
