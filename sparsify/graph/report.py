"""Human-readable views of a ChannelGraph."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from sparsify.graph.channel_graph import ChannelGraph, ChannelGroup


def _status(g: ChannelGroup) -> str:
    if g.prunable:
        return "prunable" if g.exact else f"prunable, inexact: {g.inexact[0]}"
    return f"no: {g.why_not()}"


def groups_table(cg: ChannelGraph, show_all: bool = True, max_members: int = 4) -> Table:
    """A table of the channel groups: width, members, and whether (or why not) they are prunable."""
    table = Table(title=f"Channel groups of {type(cg.model).__name__}", show_lines=False)
    table.add_column("id", justify="right")
    table.add_column("group")
    table.add_column("width", justify="right")
    table.add_column("members")
    table.add_column("status")
    for g in cg.groups:
        if not show_all and not g.prunable:
            continue
        roles: dict[str, list[str]] = {}
        for m in g.members:
            if m.role not in roles.setdefault(m.module or m.tensor, []):
                roles[m.module or m.tensor].append(m.role)
        names = [f"{name} ({'/'.join(r)})" for name, r in roles.items()]
        more = f" … (+{len(names) - max_members})" if len(names) > max_members else ""
        shown = ", ".join(names[:max_members]) + more
        table.add_row(str(g.id), g.name, str(g.width), shown, _status(g))
    return table


def summary(cg: ChannelGraph) -> str:
    prunable = cg.prunable_groups()
    exact = sum(g.exact for g in prunable)
    return (f"{len(cg.groups)} groups, {len(prunable)} prunable ({exact} exact, {len(prunable) - exact} "
            f"inexact), {sum(g.width for g in prunable)} prunable structures")


def print_groups(cg: ChannelGraph, show_all: bool = True, console: Console | None = None) -> None:
    console = console or Console()
    console.print(groups_table(cg, show_all))
    console.print(summary(cg))
