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

The index analysis of a chain (index tensors, written sizes, dims that may shrink) is in
``layout_chain.py``; this module decides the couplings from it and registers the rule.
"""

from __future__ import annotations

import operator

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from sparsify.graph.builder import OpContext, value_infos
from sparsify.graph.module_types import sizes_are_synced
from sparsify.graph.op_rules import register_op_rule
from sparsify.graph.rules.common import couple_slice
from sparsify.graph.rules.gather import couple_index, tensor_index_of_getitem
from sparsify.graph.rules.layout_chain import (
    UnsupportedLayout,
    chain_nodes,
    coords,
    foreign_sizes,
    free_dims,
    index_tensor,
    input_index,
    is_layout,
    literal_sizes,
    resolve,
    size_args,
    varies,
)
from sparsify.graph.trace import TensorInfo

LAYOUT_FUNCTIONS = (torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.swapaxes,
                    torch.squeeze, torch.unsqueeze, torch.t, torch.movedim, torch.unflatten,
                    torch.broadcast_to, torch.channel_shuffle, torch.nn.functional.channel_shuffle,
                    operator.getitem)
LAYOUT_METHODS = ("view", "reshape", "flatten", "permute", "transpose", "swapaxes", "contiguous",
                  "squeeze", "unsqueeze", "expand", "t", "movedim", "unflatten", "broadcast_to",
                  "repeat")
LAYOUT_MODULES = (nn.Flatten, nn.Unflatten, nn.ChannelShuffle)


def layout(ctx: OpContext) -> None:
    """Analyse the layout chain from its root to this node if this node leaves the chain."""
    node = ctx.node
    if node.target is operator.getitem and not isinstance(ctx.value(node.args[0]), TensorInfo):
        _tuple_element(ctx)
        return
    if ctx.out_info is None:
        return
    if node.target is operator.getitem and (tensor_index := tensor_index_of_getitem(ctx)) is not None:
        couple_index(ctx, node.args[0], tensor_index)  # x[idx] with a tensor: selection by data (rules/gather)
        return
    if all(is_layout(u, ctx) and not _gathers(ctx, u) for u in node.users):
        if node.users:
            return  # interior of a chain: analysed from its exits
    try:
        root, idx, literals, hard = index_tensor(ctx, node)
    except UnsupportedLayout as exc:
        ctx.block_all(f"{ctx.describe()}: {exc}")
        return
    except Exception as exc:  # an op that cannot run on an index tensor
        ctx.block_all(f"{ctx.describe()} could not be analysed ({type(exc).__name__}: {exc})")
        return
    _block_one_head_splits(ctx, node, root)
    _couple_foreign_sizes(ctx, node, root)
    _couple_interior_splits(ctx, node, root)
    _classify(ctx, node, root, idx, literals, hard)


def _shuffle_groups(ctx: OpContext, node: fx.Node) -> int | None:
    """The group count of a channel shuffle op (nn.ChannelShuffle, torch.channel_shuffle), else None."""
    if node.op == "call_module":
        module = ctx.traced.graph_module.get_submodule(str(node.target))
        return module.groups if isinstance(module, nn.ChannelShuffle) else None
    if node.op == "call_function" and node.target is torch.channel_shuffle:
        return int(resolve(ctx, node.args[1] if len(node.args) > 1 else node.kwargs["groups"]))
    return None


def _couple_interior_splits(ctx: OpContext, exit_node: fx.Node, root: fx.Node) -> None:
    """Inside a chain, a channel dim split into (fixed, free) factors and merged back (channel
    shuffle) stays valid after pruning only if channels are removed along the free factor: all
    channels sharing a free coordinate form one structure. A channel shuffle op hides that split
    (groups × channels per group) inside itself, so it is coupled as if written out."""
    node = exit_node
    while isinstance(node, fx.Node) and is_layout(node, ctx):
        if node is not exit_node:
            _, idx, literals, hard = index_tensor(ctx, node)
            # a dim is split by a view/reshape/unflatten; later ops (transpose, slice) only carry the split
            splits = size_args(ctx, node) is not None
            _couple_split(ctx, root, idx, free_dims(ctx, node, literals), node.name, hard, splits)
        groups = _shuffle_groups(ctx, node)
        if groups:
            _, parent_idx, _, _ = input_index(ctx, node)
            split = parent_idx.unflatten(1, (groups, -1))  # (N, groups, channels per group, ...)
            _couple_split(ctx, root, split, set(range(split.ndim)) - {1}, node.name, None)
        node = node.args[0]


def _couple_split(ctx: OpContext, root: fx.Node, idx: torch.Tensor, may_shrink: set[int], where: str,
                  hard: set[int] | None, splits: bool = True) -> None:
    """For each dim of ``root`` spread over several dims of ``idx``, the channels sharing a
    coordinate along the one free (not hard-coded) dim among them are one structure. Only the channels
    that ``idx`` holds are coupled: where a slice (``qkv[..., :q_width]``) keeps part of the dim, the
    other channels are not in this output and this split says nothing about them."""
    in_shape = ctx.traced.values[root.name].shape
    for i, g in enumerate(coords(in_shape, idx)):
        if in_shape[i] <= 1:
            continue
        outs = [j for j in range(idx.ndim) if varies(g, j)]
        space = ctx.space(root, i)
        fixed = outs and outs[0] not in may_shrink and (hard is None or idx.shape[outs[0]] in hard)
        if len(outs) == 1 and fixed:  # e.g. view(b, groups, c // groups, ...) with groups == c
            ctx.block(space, f"{ctx.describe()}: '{where}' gives dim {i} of '{root.name}' the size "
                             f"{idx.shape[outs[0]]}, a constant in the model's code")
        if len(outs) <= 1 or not splits:
            continue
        free = [j for j in outs if j in may_shrink]
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
    for node in chain_nodes(ctx, exit_node):
        sizes = size_args(ctx, node)
        if sizes is None:
            continue
        first, args = sizes
        _, idx, literals, _ = index_tensor(ctx, node)
        before = tuple(input_index(ctx, node)[1].shape)
        if sum(t == 1 for t in idx.shape) <= sum(t == 1 for t in before):
            continue  # no dim of size 1 made: a -1 of 1 here is an existing dim (batch, heads) of size 1
        free = free_dims(ctx, node, literals)
        ones = [first + k for k in range(len(args)) if first + k in free and idx.shape[first + k] == 1]
        if not ones:
            continue
        for i, g in enumerate(coords(in_shape, idx)):
            outs = [j for j in range(idx.ndim) if varies(g, j)]
            if in_shape[i] <= 1 or len(outs) != 1 or outs[0] in free or not first <= outs[0] < first + len(args):
                continue
            ctx.block(ctx.space(root, i), f"{ctx.describe()}: '{node.name}' gives dim {i} of '{root.name}' the "
                                          f"written size {idx.shape[outs[0]]}, a constant in the model's code, "
                                          f"beside a new dim {ones[0]} of size 1 written -1 or computed (one "
                                          "attention head): pruning would change that dim instead and break the "
                                          "view; a head_dim that follows pruning is written -1: view(b, s, heads, "
                                          "-1) (Hugging Face: sparsify.hf.explicit_attention_)")


def _couple_foreign_sizes(ctx: OpContext, exit_node: fx.Node, root: fx.Node) -> None:
    """A size read from another tensor's shape (``b, n, c = x.shape``, then ``y.reshape(b, n, c)``) ties
    the two widths: after pruning the view is valid only if both dims still agree. Where the size is
    exactly ``x.shape[d]`` and the dim it sizes is one root dim passed through (or the exit's own dim),
    the two dims are coupled (one group); otherwise (``c // heads``, a split or merged dim) both are
    barriers."""
    in_shape = ctx.traced.values[root.name].shape
    for node in chain_nodes(ctx, exit_node):
        for j, pure, reads in foreign_sizes(ctx, node):
            _, idx, _, _ = index_tensor(ctx, node)
            feeding = [i for i, g in enumerate(coords(in_shape, idx)) if in_shape[i] > 1 and varies(g, j)]
            spaces = [ctx.space(t, d) for t, d in reads if d is not None] if all(
                d is not None for _, d in reads) else None
            if pure and spaces and node is exit_node:
                ctx.same(spaces[0], ctx.out(j))
                continue
            if pure and spaces and (not feeding or (len(feeding) == 1 and in_shape[feeding[0]] == idx.shape[j]
                                                    and sum(varies(coords(in_shape, idx)[feeding[0]], k)
                                                            for k in range(idx.ndim)) == 1)):
                ctx.same(spaces[0], ctx.space(root, feeding[0]) if feeding else None)
                continue
            names = ", ".join(f"{t.name}.shape[{'' if d is None else d}]" for t, d in reads)
            reason = (f"{ctx.describe()}: '{node.name}' sizes dim {j} from {names}, the shape of another tensor, "
                      "whose width pruning would change separately; write -1 (or a size read from the tensor "
                      "being reshaped) to let it follow")
            for t, d in reads:
                info = ctx.info(t)
                for dd in (range(info.ndim) if d is None and info is not None else [d] if d is not None else []):
                    ctx.block(ctx.space(t, dd), reason)
            for i in feeding:
                ctx.block(ctx.space(root, i), reason)
            if node is exit_node:
                ctx.block(ctx.out(j), reason)


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


def _head_split(ctx: OpContext, exit_node: fx.Node, root: fx.Node, idx: torch.Tensor, i: int,
                hard: set[int]) -> tuple[set[int], str]:
    """Root dim ``i`` split into heads × head_dim (``view(b, s, -1, head_dim)``, maybe transposed or
    repeated after): couple each head's channels with its position along the exit's head dim and
    block the head_dim dims. Returns (the exit dims it handled, or an empty set and why not)."""
    in_shape = ctx.traced.values[root.name].shape
    width = in_shape[i]
    for node in chain_nodes(ctx, exit_node):  # the op that splits dim i
        _, split_idx, literals, _ = index_tensor(ctx, node)
        g = coords(in_shape, split_idx)[i]
        outs = [j for j in range(split_idx.ndim) if varies(g, j)]
        if len(outs) > 1:
            break
    else:
        return set(), "no op of the chain splits it"
    where = f"'{node.name}'"
    free = [j for j in outs if j in free_dims(ctx, node, literals)]
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
    h = torch.as_tensor(head_of)[coords(in_shape, idx)[i]]  # head of every exit element
    head_dims = [j for j in range(idx.ndim) if varies(h, j)]
    if len(head_dims) != 1:
        return set(), f"the heads of {where} are spread over dims {head_dims} of the result"
    jh = head_dims[0]
    g_exit = coords(in_shape, idx)
    if any(varies(g_exit[k], jh) for k in range(len(in_shape)) if k != i and in_shape[k] > 1):
        return set(), f"dim {jh} mixes the heads of {where} with another dim"
    # the split itself was judged by position (-1 or computed) above; a later op may still hard-code it
    later = [literal_sizes(ctx, n) for n in chain_nodes(ctx, exit_node) if n is not node and not sizes_are_synced(n)]
    if idx.shape[jh] in set().union(*later):
        return set(), f"the head count {idx.shape[jh]} of dim {jh} is a constant in the model's code"
    index = [0] * idx.ndim
    index[jh] = slice(None)
    a = h[tuple(index)].numpy()  # head at each position of the head dim
    counts = np.bincount(a, minlength=heads)
    if slots and counts.min() == 0 and counts.max() == 1:  # a block of head_dim slots (rotary halves)
        first = np.unique(head_of, return_index=True)[1]
        why = couple_slice(ctx, chain_nodes(ctx, exit_node), ctx.space(root, i), head_of, first, a, heads)
        if why:
            return set(), f"dim {jh} {why}"
    elif counts.min() == 0 or counts.max() != counts.min():
        return set(), f"dim {jh} selects or repeats heads unevenly ({counts.tolist()} times each)"
    fixed = [j for j in range(idx.ndim) if j != jh and varies(g_exit[i], j)]
    if any(varies(g_exit[k], j) for j in fixed for k in range(len(in_shape)) if k != i and in_shape[k] > 1):
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
    coord_of = coords(in_shape, idx)
    dep = np.zeros((len(in_shape), len(out_shape)), dtype=bool)
    for i, g in enumerate(coord_of):
        if in_shape[i] > 1:
            for j in range(len(out_shape)):
                dep[i, j] = varies(g, j)
    what = ctx.describe()

    def line(i: int, j: int) -> np.ndarray:
        g = coord_of[i]
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
    return couple_slice(ctx, chain_nodes(ctx, exit_node), ctx.space(root, i), slot, slot, a, width) == ""


def _gathers(ctx: OpContext, node: fx.Node) -> bool:
    """Whether ``node`` is ``x[idx]`` with a tensor index: it couples its input itself, so a layout op
    before it is a chain exit rather than deferring to it."""
    return node.target is operator.getitem and tensor_index_of_getitem(OpContext(ctx.traced, ctx.facts, node,
                                                                                 "layout")) is not None


def _uniform_repeat(line: np.ndarray, width: int) -> bool:
    """Whether ``line`` (the input channel at each output position) holds every channel of a dim of
    ``width`` channels the same number (> 1) of times."""
    if len(line) <= width or len(line) % width:
        return False
    return bool((np.bincount(line, minlength=width) == len(line) // width).all())


register_op_rule("layout", layout, functions=LAYOUT_FUNCTIONS, methods=LAYOUT_METHODS,
                 modules=LAYOUT_MODULES)


def reshape_as(ctx: OpContext) -> None:
    """``x.reshape_as(y)``: to ``y``'s own shape it is the identity, and dim d of x, y and the output are
    the same channels (so their widths stay equal after pruning). To another shape (a weight standardised
    as ``(1, out, -1)`` and reshaped back) it is not analysed: a barrier."""
    x, y = ctx.node.args[0], ctx.node.args[1]
    xi, yi, out = ctx.info(x), ctx.info(y), ctx.out_info
    if xi is None or yi is None or out is None:
        return
    if tuple(xi.shape) != tuple(yi.shape):
        ctx.block_all(f"{ctx.describe()} reshapes {tuple(xi.shape)} to another shape {tuple(yi.shape)}, which is "
                      "not analysed; write it as x.reshape(...) with sizes to have it analysed as a layout op")
        return
    for d in range(out.ndim):
        ctx.same(ctx.space(x, d), ctx.out(d))
        ctx.same(ctx.space(y, d), ctx.out(d))


register_op_rule("reshape_as", reshape_as, methods=("reshape_as",),
                 functions=tuple(getattr(torch.ops.aten.reshape_as, n) for n in torch.ops.aten.reshape_as.overloads()))
