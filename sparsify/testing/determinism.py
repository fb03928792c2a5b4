"""Graph building must be deterministic: the same model gives the same channel groups every time."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from sparsify.graph.channel_graph import ChannelGraph, build_channel_graph

Example = tuple[nn.Module, Any]


def check_deterministic(build_fn: Callable[[], Example], builds: int = 2) -> str:
    """Build the channel graph of ``build_fn()``'s (model, example inputs) ``builds`` times, each from a
    fresh model, and raise ``AssertionError`` naming the first group that differs. Returns the signature."""
    graphs = [build_channel_graph(*build_fn()) for _ in range(builds)]
    for other in graphs[1:]:
        assert_same_groups(graphs[0], other)
    return graphs[0].signature()


def assert_same_groups(a: ChannelGraph, b: ChannelGraph) -> None:
    """Raise ``AssertionError`` describing the first group in which two graphs differ."""
    difference = first_difference(a.signature_rows(), b.signature_rows())
    if difference:
        raise AssertionError(difference)


def first_difference(rows_a: Sequence[Sequence[Any]], rows_b: Sequence[Sequence[Any]]) -> str | None:
    """The first group in which two :meth:`ChannelGraph.signature_rows` lists differ, in words (``None``
    when equal). Rows that went through JSON (lists for tuples) compare equal to each other."""
    if len(rows_a) != len(rows_b):
        return f"{len(rows_a)} vs {len(rows_b)} channel groups"
    for ra, rb in zip(rows_a, rows_b, strict=True):
        if ra != rb:
            fields = ("name", "width", "kind", "prunable", "exact", "members", "blocked", "inexact")
            differ = [f for f, x, y in zip(fields, ra, rb, strict=True) if x != y]
            return f"group {ra[0]!r} differs in {differ}: {tuple(ra[:5])} vs {tuple(rb[:5])}"
    return None


def signature_of(builder: str) -> str:
    """The graph signature of the example that ``builder`` ("package.module:function", called with no
    arguments, returning (model, example inputs)) makes."""
    module, _, name = builder.partition(":")
    build = getattr(importlib.import_module(module), name)
    return build_channel_graph(*build()).signature()


def signatures_in_subprocess(builders: list[str], timeout: float = 600) -> list[str]:
    """:func:`signature_of` for each builder, computed in one fresh Python process (other memory,
    other hash seed)."""
    code = ("import sys; from sparsify._compat import import_torchvision\n"
            "try:\n    import_torchvision()\nexcept ModuleNotFoundError:\n    pass\n"
            "from sparsify.testing.determinism import signature_of\n"
            "for b in sys.argv[1:]:\n    print('signature', signature_of(b))")
    env = {**os.environ, "PYTHONHASHSEED": "random"}
    done = subprocess.run([sys.executable, "-c", code, *builders], capture_output=True, text=True,
                          timeout=timeout, env=env, check=False)
    if done.returncode:
        raise RuntimeError(f"building {builders} in a subprocess failed:\n{done.stderr[-3000:]}")
    return [line.split()[1] for line in done.stdout.splitlines() if line.startswith("signature ")]
