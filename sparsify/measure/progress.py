"""A progress bar for work that takes more than a few seconds: shown on a terminal, silent otherwise."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

__all__ = ["progress"]

T = TypeVar("T")


def progress(items: Iterable[T], description: str, *, total: int | None = None,
             console: Console | None = None) -> Iterator[T]:
    """Yield ``items`` while a rich progress bar counts them on stderr.

    The bar is drawn only when ``console`` (default: stderr) is a terminal, and removed when done; in
    logs, pipes, CI and tests nothing is printed. ``total`` defaults to ``len(items)`` where it exists.
    """
    console = console or Console(stderr=True)
    if not console.is_terminal:
        yield from items
        return
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task(description, total=total)
        for item in items:
            yield item
            bar.advance(task)
