"""A chain of layout ops as one function on element indices (the machinery of the layout rule).

The ops of a chain (view, reshape, flatten, permute, transpose, squeeze, expand, slicing, shuffles) are
applied to a tensor of element indices of the chain's root: ``index_tensor`` says where each element of a
node comes from. Beside it: the sizes the model's code writes into the ops (``literal_sizes``; those
not in a module type with synced sizes are hard-coded), the output dims that may shrink with pruning
(``free_dims``: written -1 or computed from the shape), and the coordinates of the root's dims in an index
tensor (``coords``, ``varies``). ``layout.py`` couples channels from these.
"""

from __future__ import annotations

import operator
from typing import Any

import numpy as np
import torch
import torch.fx as fx

from sparsify.graph.builder import OpContext
from sparsify.graph.module_types import sizes_are_synced
from sparsify.graph.op_rules import find_rule
from sparsify.graph.trace import TensorInfo

_SIZE_TAKING = {"view", "reshape", "expand", "unflatten", "repeat", "broadcast_to"}
_SIZE_ARITHMETIC = (operator.floordiv, operator.mul, operator.add, operator.sub, operator.getitem)


class UnsupportedLayout(Exception):
    """A layout op the index analysis cannot follow (a tensor argument, a non-tensor input)."""


def is_layout(node: fx.Node, ctx: OpContext) -> bool:
    """Whether ``node`` is a layout op (its rule is the layout rule, or it indexes a tensor)."""
    if node.op == "call_function" and node.target is operator.getitem:
        return isinstance(ctx.traced.values.get(node.args[0].name), TensorInfo) if isinstance(
            node.args[0], fx.Node) else False
    rule = find_rule(node, ctx.traced.graph_module)
    return rule is not None and rule.kind in ("layout", "layout_aten")


def resolve(ctx: OpContext, arg: Any) -> Any:
    """A non-tensor argument with its graph nodes replaced by their traced values (sizes, slices)."""
    if isinstance(arg, fx.Node):
        v = ctx.traced.values.get(arg.name)
        if isinstance(v, TensorInfo):
            raise UnsupportedLayout(f"a tensor argument ({arg.name}) inside a layout op")
        return v
    if isinstance(arg, slice):
        return slice(resolve(ctx, arg.start), resolve(ctx, arg.stop), resolve(ctx, arg.step))
    if isinstance(arg, (tuple, list)):
        return type(arg)(resolve(ctx, a) for a in arg)
    if isinstance(arg, dict):
        return {k: resolve(ctx, v) for k, v in arg.items()}
    return arg


def _apply(ctx: OpContext, node: fx.Node, idx: torch.Tensor) -> torch.Tensor:
    rest = [resolve(ctx, a) for a in node.args[1:]]
    kwargs = {k: resolve(ctx, v) for k, v in node.kwargs.items()}
    if node.op == "call_method":
        return getattr(idx, str(node.target))(*rest, **kwargs)
    if node.op == "call_function":
        return node.target(idx, *rest, **kwargs)
    module = ctx.traced.graph_module.get_submodule(str(node.target))
    return module(idx)


def _op_name(node: fx.Node) -> str:
    """The method, function or aten op name of ``node`` (``view``, ``reshape``, ``unflatten``, ...)."""
    if isinstance(node.target, torch._ops.OpOverload):
        return node.target.overloadpacket.__name__
    return str(node.target) if node.op == "call_method" else getattr(node.target, "__name__", "")


def literal_sizes(ctx: OpContext, node: fx.Node) -> set[int]:
    """Integer sizes written into ``node``'s arguments (not computed by graph nodes)."""
    name = _op_name(node)
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


def input_index(ctx: OpContext, node: fx.Node) -> tuple[fx.Node, torch.Tensor, set[int], set[int]]:
    """(chain root, index tensor of ``node``'s input elements in the root, size literals on the way,
    those of them that are hard-coded: not in a module type declared with synced sizes)."""
    parent = node.args[0]
    if not isinstance(parent, fx.Node):
        raise UnsupportedLayout("a layout op whose input is not a traced tensor")
    if is_layout(parent, ctx):
        return index_tensor(ctx, parent)
    info = ctx.traced.values.get(parent.name)
    if not isinstance(info, TensorInfo):
        raise UnsupportedLayout("a layout op whose input is not a tensor")
    return parent, torch.arange(int(np.prod(info.shape)), dtype=torch.int64).reshape(info.shape), set(), set()


def index_tensor(ctx: OpContext, node: fx.Node) -> tuple[fx.Node, torch.Tensor, set[int], set[int]]:
    """(chain root, index tensor of this node's elements in the root, size literals on the way, the
    hard-coded ones among them)."""
    cache = ctx.facts.layout_cache
    if node.name in cache:
        return cache[node.name]
    root, parent_idx, lits, hard = input_index(ctx, node)
    idx = _apply(ctx, node, parent_idx)
    own = literal_sizes(ctx, node)
    result = (root, idx, lits | own, hard if sizes_are_synced(node) else hard | own)
    cache[node.name] = result
    return result


def chain_nodes(ctx: OpContext, exit_node: fx.Node) -> list[fx.Node]:
    """The layout nodes from the chain's first op to ``exit_node``."""
    nodes = []
    node = exit_node
    while isinstance(node, fx.Node) and is_layout(node, ctx):
        nodes.append(node)
        node = node.args[0]
    return nodes[::-1]


def coords(in_shape: tuple[int, ...], idx: torch.Tensor) -> list[torch.Tensor]:
    """The coordinate along each root dim of every element of ``idx`` (flat indices into ``in_shape``)."""
    if not in_shape or 0 in in_shape:
        strides = np.cumprod((1, *reversed(in_shape[1:])))[::-1]
        return [(idx // int(strides[i])) % in_shape[i] for i in range(len(in_shape))]
    # one C pass, ~20× faster than div/mod; on a flat contiguous copy only: NumPy's unravel_index reads past
    # its iterator buffer for a larger-than-buffer input with a zero stride (an expand) or a unit dim ((N, 1)),
    # returning wrong coordinates or memory addresses (numpy/numpy#31980)
    flat = np.ascontiguousarray(idx.numpy()).reshape(-1)
    return [torch.from_numpy(c.reshape(idx.shape)) for c in np.unravel_index(flat, in_shape)]


def varies(g: torch.Tensor, j: int) -> bool:
    t = g.shape[j]
    return t > 1 and bool((g.narrow(j, 1, t - 1) != g.narrow(j, 0, t - 1)).any())


def size_args(ctx: OpContext, node: fx.Node) -> tuple[int, list[Any]] | None:
    """(first output dim, the size arguments written for it and the following dims) of a view,
    reshape or unflatten; None for other ops."""
    name = _op_name(node)
    rest = list(node.args[1:])
    if name in ("view", "reshape", "_unsafe_view"):
        sizes = rest[0] if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else rest
        return (0, list(sizes)) if sizes else None
    if name == "unflatten" and len(rest) >= 2:
        info = ctx.info(node.args[0])
        return (int(rest[0]) % info.ndim, list(rest[1])) if info is not None else None
    return None


def _shape_sources(arg: Any, found: set[str]) -> bool:
    """Collect the tensors whose shapes a computed size reads (``x.shape[2] // heads``); False if it
    also depends on something else."""
    if not isinstance(arg, fx.Node):
        return isinstance(arg, int)
    if (arg.op == "call_method" and arg.target == "size") or (
            arg.op == "call_function" and arg.target is getattr and arg.args[1:] == ("shape",)):
        found.add(arg.args[0].name)
        return True
    if arg.op == "call_function" and arg.target in _SIZE_ARITHMETIC:
        return all(_shape_sources(a, found) for a in arg.args)
    return False


def shape_reads(arg: Any, found: list[tuple[fx.Node, int | None]]) -> bool:
    """Collect the (tensor, dim) sizes a computed size reads (``x.shape[2] // heads``: (x, 2); dim None: a
    whole ``x.shape``); False if it also depends on something else."""
    if not isinstance(arg, fx.Node):
        return isinstance(arg, int)
    if arg.op == "call_method" and arg.target == "size":
        found.append((arg.args[0], arg.args[1] if len(arg.args) > 1 else arg.kwargs.get("dim")))
        return True
    if arg.op == "call_function" and arg.target is getattr and arg.args[1:] == ("shape",):
        found.append((arg.args[0], None))
        return True
    if arg.op == "call_function" and arg.target is operator.getitem and isinstance(arg.args[1], int):
        inner: list[tuple[fx.Node, int | None]] = []
        if shape_reads(arg.args[0], inner) and len(inner) == 1 and inner[0][1] is None:
            found.append((inner[0][0], arg.args[1]))
            return True
    if arg.op == "call_function" and arg.target in _SIZE_ARITHMETIC:
        return all(shape_reads(a, found) for a in arg.args)
    return False


def foreign_sizes(ctx: OpContext, node: fx.Node) -> list[tuple[int, bool, list[tuple[fx.Node, int | None]]]]:
    """The sizes of a view/reshape/unflatten ``node`` read from the shape of a tensor outside its chain
    (``b, n, c = x.shape`` of the block input, then ``y.reshape(b, n, c)``): (output dim, whether the size
    is exactly one such read, the (tensor, dim) reads)."""
    sizes = size_args(ctx, node)
    if sizes is None:
        return []
    first, args = sizes
    chain = {n.name for n in chain_nodes(ctx, node)}
    root = chain_nodes(ctx, node)[0].args[0]
    chain |= {root.name} if isinstance(root, fx.Node) else set()
    out = []
    for k, a in enumerate(args):
        found: list[tuple[fx.Node, int | None]] = []
        if isinstance(a, fx.Node) and shape_reads(a, found) and found and not {t.name for t, _ in found} <= chain:
            pure = len(found) == 1 and found[0][1] is not None and _is_read(a)
            out.append((first + k, pure, found))
    return out


def _is_read(a: fx.Node) -> bool:
    """``x.size(d)`` or ``x.shape[d]`` itself (no arithmetic on it)."""
    return (a.op == "call_method" and a.target == "size") or (
        a.op == "call_function" and a.target is operator.getitem)


def free_dims(ctx: OpContext, node: fx.Node, literals: set[int]) -> set[int]:
    """The output dims of ``node`` whose size may shrink with pruning: for view/reshape/unflatten,
    those written as -1 or computed from the shape of the tensor being reshaped (or of one before it
    in the chain; a size computed from another tensor, such as the block input's width, stays fixed);
    for other ops, those whose size is no literal."""
    shape = ctx.traced.values[node.name].shape
    sizes = size_args(ctx, node)
    if sizes is None:
        return {j for j, t in enumerate(shape) if t not in literals}
    first, args = sizes
    chain = {n.name for n in chain_nodes(ctx, node)}
    root = node
    while isinstance(root, fx.Node) and root.name in chain:
        root = root.args[0]
    chain |= {root.name} if isinstance(root, fx.Node) else set()
    free = set()
    for k, a in enumerate(args):
        found: set[str] = set()
        if a == -1 or (isinstance(a, fx.Node) and _shape_sources(a, found) and found and found <= chain):
            free.add(first + k)
    return free | {j for j in range(len(shape)) if not first <= j < first + len(args)}
