"""Layout ops (view, reshape, flatten, permute, transpose, squeeze, expand, slicing, shuffles).

A chain of layout ops is analysed as one function from the chain's input to each value that leaves
the chain: the same ops are applied to a tensor of element indices, and each output dim is
classified against the input dims as the same channels (possibly permuted, as in channel
shuffle), a product of input dims (flatten), a repetition (``repeat_kv``'s expand + reshape), or new.
A channel dim split into heads (``view(b, s, -1, head_dim)``) couples each head's channels to one
position of the head dim; the head_dim factor is a barrier (every head must keep the same size). With
a constant head count (``view(b, s, heads, -1)``) the roles swap: head_dim slots (``rules/head_dim.py``).

A size written in the model's code (``x.reshape(n, 768, -1)``) makes its dim a barrier, since
pruning would not update the constant. ``torch.export`` writes every size as a constant; modules
whose code computes its sizes from tensor shapes or from attributes that sparsify keeps in sync
(Hugging Face attention, ``Conv1D``) are declared with
``sparsify.extend.register_module_type(cls, synced_sizes=True)``.
"""

from __future__ import annotations

import operator
from typing import Any

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from sparsify.graph.builder import OpContext, value_infos
from sparsify.graph.module_types import sizes_are_synced
from sparsify.graph.op_rules import find_rule, register_op_rule
from sparsify.graph.rules.common import couple_slice
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
    """Integer sizes written into ``node``'s arguments (not computed by graph nodes)."""
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


def _input_index(ctx: OpContext, node: fx.Node) -> tuple[fx.Node, torch.Tensor, set[int], set[int]]:
    """(chain root, index tensor of ``node``'s input elements in the root, size literals on the way,
    those of them that are hard-coded: not in a module type declared with synced sizes)."""
    parent = node.args[0]
    if not isinstance(parent, fx.Node):
        raise _Unsupported("a layout op whose input is not a traced tensor")
    if _is_layout(parent, ctx):
        return _index_tensor(ctx, parent)
    info = ctx.traced.values.get(parent.name)
    if not isinstance(info, TensorInfo):
        raise _Unsupported("a layout op whose input is not a tensor")
    return parent, torch.arange(int(np.prod(info.shape)), dtype=torch.int64).reshape(info.shape), set(), set()


def _index_tensor(ctx: OpContext, node: fx.Node) -> tuple[fx.Node, torch.Tensor, set[int], set[int]]:
    """(chain root, index tensor of this node's elements in the root, size literals on the way, the
    hard-coded ones among them)."""
    cache = ctx.facts.layout_cache
    if node.name in cache:
        return cache[node.name]
    root, parent_idx, lits, hard = _input_index(ctx, node)
    idx = _apply(ctx, node, parent_idx)
    own = _literals(ctx, node)
    result = (root, idx, lits | own, hard if sizes_are_synced(node) else hard | own)
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
        root, idx, literals, hard = _index_tensor(ctx, node)
    except _Unsupported as exc:
        ctx.block_all(f"{ctx.describe()}: {exc}")
        return
    except Exception as exc:  # an op that cannot run on an index tensor
        ctx.block_all(f"{ctx.describe()} could not be analysed ({type(exc).__name__}: {exc})")
        return
    _block_one_head_splits(ctx, node, root)
    _couple_interior_splits(ctx, node, root)
    _classify(ctx, node, root, idx, literals, hard)


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


def _couple_interior_splits(ctx: OpContext, exit_node: fx.Node, root: fx.Node) -> None:
    """Inside a chain, a channel dim split into (fixed, free) factors and merged back (channel
    shuffle) stays valid after pruning only if channels are removed along the free factor: all
    channels sharing a free coordinate form one structure. A channel shuffle op hides that split
    (groups × channels per group) inside itself, so it is coupled as if written out."""
    node = exit_node
    while isinstance(node, fx.Node) and _is_layout(node, ctx):
        if node is not exit_node:
            _, idx, literals, hard = _index_tensor(ctx, node)
            # a dim is split by a view/reshape/unflatten; later ops (transpose, slice) only carry the split
            splits = _size_args(ctx, node) is not None
            _couple_split(ctx, root, idx, _free_dims(ctx, node, literals), node.name, hard, splits)
        groups = _shuffle_groups(ctx, node)
        if groups:
            _, parent_idx, _, _ = _input_index(ctx, node)
            split = parent_idx.unflatten(1, (groups, -1))  # (N, groups, channels per group, ...)
            _couple_split(ctx, root, split, set(range(split.ndim)) - {1}, node.name, None)
        node = node.args[0]


def _couple_split(ctx: OpContext, root: fx.Node, idx: torch.Tensor, free_dims: set[int], where: str,
                  hard: set[int] | None, splits: bool = True) -> None:
    """For each dim of ``root`` spread over several dims of ``idx``, the channels sharing a
    coordinate along the one free (not hard-coded) dim among them are one structure. Only the channels
    that ``idx`` holds are coupled: where a slice (``qkv[..., :q_width]``) keeps part of the dim, the
    other channels are not in this output and this split says nothing about them."""
    in_shape = ctx.traced.values[root.name].shape
    for i, g in enumerate(_coords(in_shape, idx)):
        if in_shape[i] <= 1:
            continue
        outs = [j for j in range(idx.ndim) if _varies(g, j)]
        space = ctx.space(root, i)
        fixed = outs and outs[0] not in free_dims and (hard is None or idx.shape[outs[0]] in hard)
        if len(outs) == 1 and fixed:  # e.g. view(b, groups, c // groups, ...) with groups == c
            ctx.block(space, f"{ctx.describe()}: '{where}' gives dim {i} of '{root.name}' the size "
                             f"{idx.shape[outs[0]]}, a constant in the model's code")
        if len(outs) <= 1 or not splits:
            continue
        free = [j for j in outs if j in free_dims]
        if len(free) != 1:
            ctx.block(space, f"{ctx.describe()}: dim {i} of '{root.name}' is reshaped into dims "
                             f"{outs} of '{where}' and it is ambiguous which one shrinks")
            continue
        position = torch.arange(idx.shape[free[0]]).reshape(
            [-1 if j == free[0] else 1 for j in range(idx.ndim)]).expand(idx.shape)
        channel, coord = g.reshape(-1).numpy(), position.reshape(-1).numpy()
        ctx.pairs(space, space, _lowest_channel_at(coord, channel), channel)


def _lowest_channel_at(coord: np.ndarray, channel: np.ndarray) -> np.ndarray:
    """For every element, the lowest channel among the elements with the same free coordinate (a
    channel held at two coordinates, as after a repeat, joins both)."""
    lowest = np.full(int(coord.max(initial=0)) + 1, np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(lowest, coord, channel)
    return lowest[coord]


def _block_one_head_splits(ctx: OpContext, exit_node: fx.Node, root: fx.Node) -> None:
    """A head split with a single head: ``view(b, s, -1, head_dim)`` where the -1 (or computed) head
    count comes out 1 (one key/value head). No dim is split, so :func:`_head_split` never sees it, but
    the written head_dim would not follow pruning: the -1 would absorb the change and the view fail.
    The -1 says which factor follows the width, so the literal one is a constant even in a module
    with synced sizes: block the dim. Only a view that makes a new dim of size 1 is such a split (the
    -1 of ``reshape(b, -1, L, E)`` on one head, or of ``view(-1, width)`` on one row, is an existing dim)."""
    in_shape = ctx.traced.values[root.name].shape
    for node in _chain(ctx, exit_node):
        sizes = _size_args(ctx, node)
        if sizes is None:
            continue
        first, args = sizes
        _, idx, literals, _ = _index_tensor(ctx, node)
        before = tuple(_input_index(ctx, node)[1].shape)
        if sum(t == 1 for t in idx.shape) <= sum(t == 1 for t in before):
            continue  # no dim of size 1 made: a -1 of 1 here is an existing dim (batch, heads) of size 1
        free = _free_dims(ctx, node, literals)
        ones = [first + k for k in range(len(args)) if first + k in free and idx.shape[first + k] == 1]
        if not ones:
            continue
        for i, g in enumerate(_coords(in_shape, idx)):
            outs = [j for j in range(idx.ndim) if _varies(g, j)]
            if in_shape[i] <= 1 or len(outs) != 1 or outs[0] in free or not first <= outs[0] < first + len(args):
                continue
            ctx.block(ctx.space(root, i), f"{ctx.describe()}: '{node.name}' gives dim {i} of '{root.name}' the "
                                          f"written size {idx.shape[outs[0]]}, a constant in the model's code, "
                                          f"beside a new dim {ones[0]} of size 1 written -1 or computed (one "
                                          "attention head): pruning would change that dim instead and break the "
                                          "view; a head_dim that follows pruning is written -1: view(b, s, heads, "
                                          "-1) (Hugging Face: sparsify.hf.explicit_attention_)")


def _tuple_element(ctx: OpContext) -> None:
    """Element k of a tuple-valued node (chunk, split, a module returning a tuple); an element that
    is itself a tuple (an LSTM's (h_n, c_n)) passes each of its tensors through."""
    source, k = ctx.node.args
    found = value_infos(ctx.value(ctx.node), ctx.node.name)
    if not isinstance(k, int):
        if found:
            ctx.block_all(f"{ctx.describe()}: a tuple element chosen by a computed index is not supported")
        return
    for key, info in found:
        path = tuple(int(i) for i in key[len(ctx.node.name) + 1:].split(".")) if key != ctx.node.name else ()
        for d in range(info.ndim):
            ctx.same(ctx.space(source, d, element=(k, *path)), ctx.out(d, element=path or None))


def _size_args(ctx: OpContext, node: fx.Node) -> tuple[int, list[Any]] | None:
    """(first output dim, the size arguments written for it and the following dims) of a view,
    reshape or unflatten; None for other ops."""
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    if isinstance(node.target, torch._ops.OpOverload):
        name = node.target.overloadpacket.__name__
    rest = list(node.args[1:])
    if name in ("view", "reshape", "_unsafe_view"):
        sizes = rest[0] if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else rest
        return (0, list(sizes)) if sizes else None
    if name == "unflatten" and len(rest) >= 2:
        info = ctx.info(node.args[0])
        return (int(rest[0]) % info.ndim, list(rest[1])) if info is not None else None
    return None


_SIZE_ARITHMETIC = (operator.floordiv, operator.mul, operator.add, operator.sub, operator.getitem)


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


def _free_dims(ctx: OpContext, node: fx.Node, literals: set[int]) -> set[int]:
    """The output dims of ``node`` whose size may shrink with pruning: for view/reshape/unflatten,
    those written as -1 or computed from the shape of the tensor being reshaped (or of one before it
    in the chain; a size computed from another tensor, such as the block input's width, stays fixed);
    for other ops, those whose size is no literal."""
    shape = ctx.traced.values[node.name].shape
    sizes = _size_args(ctx, node)
    if sizes is None:
        return {j for j, t in enumerate(shape) if t not in literals}
    first, args = sizes
    chain = {n.name for n in _chain(ctx, node)}
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


def _chain(ctx: OpContext, exit_node: fx.Node) -> list[fx.Node]:
    """The layout nodes from the chain's first op to ``exit_node``."""
    nodes = []
    node = exit_node
    while isinstance(node, fx.Node) and _is_layout(node, ctx):
        nodes.append(node)
        node = node.args[0]
    return nodes[::-1]


def _head_split(ctx: OpContext, exit_node: fx.Node, root: fx.Node, idx: torch.Tensor, i: int,
                hard: set[int]) -> tuple[set[int], str]:
    """Root dim ``i`` split into heads × head_dim (``view(b, s, -1, head_dim)``, maybe transposed or
    repeated after): couple each head's channels with its position along the exit's head dim and
    block the head_dim dims. Returns (the exit dims it handled, or an empty set and why not)."""
    in_shape = ctx.traced.values[root.name].shape
    width = in_shape[i]
    for node in _chain(ctx, exit_node):  # the op that splits dim i
        _, split_idx, literals, _ = _index_tensor(ctx, node)
        g = _coords(in_shape, split_idx)[i]
        outs = [j for j in range(split_idx.ndim) if _varies(g, j)]
        if len(outs) > 1:
            break
    else:
        return set(), "no op of the chain splits it"
    where = f"'{node.name}'"
    free = [j for j in outs if j in _free_dims(ctx, node, literals)]
    if len(free) != 1:
        return set(), (f"{where} splits it into dims {outs} and it is ambiguous which one shrinks; a head count "
                       "that follows pruning is written -1 or computed: view(b, s, -1, head_dim)")
    seen = np.unique(g.numpy())
    if len(seen) != width:
        return set(), f"{where} splits only some of its channels"
    position = torch.arange(split_idx.shape[free[0]]).reshape(
        [-1 if j == free[0] else 1 for j in range(split_idx.ndim)]).expand(split_idx.shape)
    head_of = np.full(width, -1, dtype=np.int64)  # every channel is written: all are in ``seen``
    head_of[g.reshape(-1).numpy()] = position.reshape(-1).numpy()
    # the free factor is the head_dim when the head count is hard-coded (view(b, s, heads, -1)): the
    # structures are then head_dim slots, slot j of every head removed together (uniform head_dim)
    slots = bool(np.any(np.diff(head_of) < 0))
    heads = int(head_of.max()) + 1
    h = torch.as_tensor(head_of)[_coords(in_shape, idx)[i]]  # head of every exit element
    head_dims = [j for j in range(idx.ndim) if _varies(h, j)]
    if len(head_dims) != 1:
        return set(), f"the heads of {where} are spread over dims {head_dims} of the result"
    jh = head_dims[0]
    g_exit = _coords(in_shape, idx)
    if any(_varies(g_exit[k], jh) for k in range(len(in_shape)) if k != i and in_shape[k] > 1):
        return set(), f"dim {jh} mixes the heads of {where} with another dim"
    # the split itself was judged by position (-1 or computed) above; a later op may still hard-code it
    later = [_literals(ctx, n) for n in _chain(ctx, exit_node) if n is not node and not sizes_are_synced(n)]
    if idx.shape[jh] in set().union(*later):
        return set(), f"the head count {idx.shape[jh]} of dim {jh} is a constant in the model's code"
    index = [0] * idx.ndim
    index[jh] = slice(None)
    a = h[tuple(index)].numpy()  # head at each position of the head dim
    counts = np.bincount(a, minlength=heads)
    if slots and counts.min() == 0 and counts.max() == 1:  # a block of head_dim slots (rotary halves)
        first = np.unique(head_of, return_index=True)[1]
        why = couple_slice(ctx, _chain(ctx, exit_node), ctx.space(root, i), head_of, first, a, heads)
        if why:
            return set(), f"dim {jh} {why}"
    elif counts.min() == 0 or counts.max() != counts.min():
        return set(), f"dim {jh} selects or repeats heads unevenly ({counts.tolist()} times each)"
    fixed = [j for j in range(idx.ndim) if j != jh and _varies(g_exit[i], j)]
    if any(_varies(g_exit[k], j) for j in fixed for k in range(len(in_shape)) if k != i and in_shape[k] > 1):
        return set(), f"a head_dim dim of {where} is mixed with another dim"
    space = ctx.space(root, i)
    first = np.unique(head_of, return_index=True)[1]  # first channel of each head (head_dim slot)
    ctx.pairs(space, space, first[head_of], np.arange(width))
    ctx.pairs(space, ctx.out(jh), first[a], np.arange(len(a)))
    for j in fixed:
        ctx.block(ctx.out(j), f"{ctx.describe()}: dim {j} indexes the heads of {where}, whose count is a constant "
                              "in the model's code (its head_dim slots are prunable; write view(b, s, -1, "
                              "head_dim) to prune whole heads instead)" if slots else
                  f"{ctx.describe()}: dim {j} indexes within attention heads (head_dim of "
                  f"{where}), which must keep the same size in every head")
    if slots:
        ctx.label(ctx.out(jh), "head_dim")
    return {jh, *fixed}, ""


def _classify(ctx: OpContext, exit_node: fx.Node, root: fx.Node, idx: torch.Tensor, literals: set[int],
              hard: set[int]) -> None:
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

    handled: set[int] = set()
    for i, s in enumerate(in_shape):
        outs = np.flatnonzero(dep[i])
        if s <= 1 or len(outs) <= 1:
            continue
        done, why = _head_split(ctx, exit_node, root, idx, i, hard)
        if done:
            handled |= done
            continue
        reason = (f"{what} splits dim {i} of '{root.name}' into dims {outs.tolist()} (e.g. attention "
                  f"heads) and cannot prune through it: {why}")
        ctx.block(ctx.space(root, i), reason)
        for j in outs:
            ctx.block(ctx.out(int(j)), reason)
    for j, t in enumerate(out_shape):
        if t <= 1 or j in handled:
            continue
        inputs = [i for i in range(len(in_shape)) if dep[i, j]]
        out_space = ctx.out(j)
        single = all(dep[i].sum() == 1 for i in inputs)
        if not inputs:
            ctx.fresh(out_space, f"{what} creates dim {j} (broadcast or new)")
        elif t in hard:
            reason = f"{what} hard-codes the size {t} of dim {j} (a constant in the model's code)"
            ctx.block(out_space, reason)
            for i in inputs:
                ctx.block(ctx.space(root, i), reason)
        elif single and len(inputs) == 1 and in_shape[inputs[0]] == t:
            ctx.permute(ctx.space(root, inputs[0]), out_space, line(inputs[0], j))
        elif single and len(inputs) == 1 and _uniform_repeat(line(inputs[0], j), in_shape[inputs[0]]):
            # repeat_kv's expand + reshape, x.repeat(...): every channel appears equally often
            ctx.pairs(ctx.space(root, inputs[0]), out_space, line(inputs[0], j), np.arange(t))
        elif single and int(np.prod([in_shape[i] for i in inputs])) == t:
            ctx.merge(out_space, [ctx.space(root, i) for i in inputs], [line(i, j) for i in inputs])
        elif single and len(inputs) == 1 and _one_head_block(ctx, exit_node, root, inputs[0], line(inputs[0], j)):
            ctx.pairs(ctx.space(root, inputs[0]), out_space, line(inputs[0], j), np.arange(t))
        else:
            reason = f"{what} mixes or slices dims {inputs} of '{root.name}' into dim {j}"
            ctx.block(out_space, reason)
            for i in inputs:
                ctx.block(ctx.space(root, i), reason)
    for i, s in enumerate(in_shape):
        if s > 1 and not dep[i].any():
            ctx.block(ctx.space(root, i), f"{what} selects from dim {i} of '{root.name}' by a constant index")


def _one_head_block(ctx: OpContext, exit_node: fx.Node, root: fx.Node, i: int, a: np.ndarray) -> bool:
    """A block ``[k·d/n, (k+1)·d/n)`` sliced from an unsplit dim of d channels in a module with synced
    sizes: the rotary half of a single-head tensor (one key/value head, ``view(b, s, 1, -1)``), which
    no head split reaches. Couples channel c with the channels at its position in the other blocks
    (as ``common.couple_slice`` does for head_dim slots); False (nothing coupled) otherwise."""
    if not sizes_are_synced(exit_node):
        return False
    width = ctx.traced.values[root.name].shape[i]
    slot = np.arange(width)
    return couple_slice(ctx, _chain(ctx, exit_node), ctx.space(root, i), slot, slot, a, width) == ""


def _uniform_repeat(line: np.ndarray, width: int) -> bool:
    """Whether ``line`` (the input channel at each output position) holds every channel of a dim of
    ``width`` channels the same number (> 1) of times."""
    if len(line) <= width or len(line) % width:
        return False
    return bool((np.bincount(line, minlength=width) == len(line) // width).all())


register_op_rule("layout", layout, functions=LAYOUT_FUNCTIONS, methods=LAYOUT_METHODS,
                 modules=LAYOUT_MODULES)
