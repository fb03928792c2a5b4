"""Checking a removal plan ``{group id or name: structure indices}`` before surgery touches anything.

Keys are group ids (``int``) or names (``str``) of the graph being pruned. Values are the indices of
the structures to remove: a list/tuple/set/range of Python ints, or a 1-D integer numpy array or torch
tensor, in ``[0, width)``, without duplicates. A boolean mask is refused rather than guessed at
(``[True, False]`` read as indices would remove structures 1 and 0): pass ``np.flatnonzero(mask)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from sparsify.errors import PruneError

__all__ = ["check_plan_key", "structure_indices"]

_MASK_FIX = ("pass the indices to remove instead: np.flatnonzero(mask) if True marks a structure to remove, "
             "np.flatnonzero(~mask) if True marks one to keep")


def check_plan_key(key: Any) -> int | str:
    """A plan key must be a group id (int, not bool) or a group name (str)."""
    if isinstance(key, (bool, np.bool_)) or not isinstance(key, (int, np.integer, str)):
        raise PruneError(f"plan key {key!r} ({type(key).__name__}) is not a channel group id (int) or name (str); "
                         "use g.id or g.name of a group of this ChannelGraph (cg.groups)")
    return key if isinstance(key, str) else int(key)


def structure_indices(group: str, width: int, values: Any) -> np.ndarray:
    """``values`` as a sorted int64 array of structure indices of ``group``, or PruneError saying how to fix it."""
    where = f"plan entry for group '{group}'"
    if values is None or isinstance(values, (str, bytes, Mapping)):
        raise PruneError(f"{where} is {type(values).__name__} {values!r:.60}; give the indices of the structures "
                         "to remove as a list of ints (e.g. [0, 3]) or an integer array")
    if isinstance(values, torch.Tensor):
        array = values.detach().cpu().numpy() if values.dtype != torch.bfloat16 else values.detach().float().numpy()
    elif isinstance(values, np.ndarray):
        array = values
    elif isinstance(values, (int, np.integer)):
        raise PruneError(f"{where} is a single number {values!r}; give a list of indices, e.g. [{values!r}]")
    else:
        try:
            items = list(values)
        except TypeError:
            raise PruneError(f"{where} is a {type(values).__name__}, not a list of structure indices; give "
                             "a list of ints or an integer array") from None
        for item in items:
            if isinstance(item, (bool, np.bool_)):
                continue  # a whole mask is refused below with the fix
            if not isinstance(item, (int, np.integer)):
                raise PruneError(f"{where} contains {item!r} ({type(item).__name__}); structure indices must be "
                                 "ints (not floats, strings, None or nested lists)")
        if len(items) and all(isinstance(i, (bool, np.bool_)) for i in items):
            array = np.asarray(items, dtype=bool)
        elif any(isinstance(i, (bool, np.bool_)) for i in items):
            raise PruneError(f"{where} mixes booleans and ints; structure indices must be ints")
        else:
            array = np.asarray([int(i) for i in items], dtype=np.int64)
    if array.dtype == bool:
        raise PruneError(f"{where} is a boolean mask of {array.size} entries, not indices: {_MASK_FIX}")
    if array.ndim != 1 and array.size:
        raise PruneError(f"{where} has shape {array.shape}; give a flat (1-D) list of structure indices")
    if array.size and array.dtype.kind not in "iu":
        raise PruneError(f"{where} has dtype {array.dtype}; structure indices must be integers (a float index would "
                         "be truncated): convert exact indices with .astype(int) or .long()")
    s = array.reshape(-1).astype(np.int64)
    if s.size and (s.min() < 0 or s.max() >= width):
        bad = s[(s < 0) | (s >= width)][:5].tolist()
        raise PruneError(f"group '{group}' has {width} structures; got indices outside [0, {width}): {bad}")
    unique = np.unique(s)
    if len(unique) != len(s):
        dup = sorted({int(v) for v in s if (s == v).sum() > 1})[:5]
        raise PruneError(f"{where} lists indices {dup} more than once; give each structure to remove once "
                         "(np.unique(indices))")
    return unique
