"""The package's layers, as docs/architecture.md draws them: imports flow one way and never form a cycle.

Every ``import`` of a ``sparsify`` module counts, also inside functions and under ``TYPE_CHECKING``: an
import that climbs a layer is a leak however it is hidden.
"""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest

import sparsify

PACKAGE = Path(sparsify.__file__).resolve().parent

# Lowest first. A module may import modules of its own layer or of lower layers only.
LAYERS: list[tuple[str, ...]] = [
    ("sparsify._version", "sparsify.errors", "sparsify.registry", "sparsify._utils", "sparsify._compat",
     "sparsify._undo", "sparsify._validation"),
    ("sparsify.graph",),
    ("sparsify.measure",),
    ("sparsify.prune",),
    ("sparsify.nn",),
    ("sparsify.adapters",),
    ("sparsify.policies",),
    ("sparsify.config", "sparsify.sparsifier", "sparsify.sparsifier_checks", "sparsify.oneshot", "sparsify.io"),
    ("sparsify.deploy", "sparsify.depth", "sparsify.hf", "sparsify.lm", "sparsify.distributed"),
    ("sparsify.testing",),
    ("sparsify.extend", "sparsify"),
    ("sparsify.cli",),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> int:
    best, depth = None, -1
    for i, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and prefix.count(".") > depth:
                best, depth = i, prefix.count(".")
    if best is None:
        raise AssertionError(f"{module} is in no layer of tests/test_architecture.py: add it to LAYERS")
    return best


def imported_modules(path: Path) -> set[str]:
    """The sparsify modules ``path`` imports (``from sparsify.x import y`` counts ``sparsify.x.y`` if a module)."""
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "sparsify")
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            if base.split(".")[0] != "sparsify":
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                is_module = (PACKAGE.parent / Path(*sub.split("."))).with_suffix(".py").exists() or (
                    PACKAGE.parent / Path(*sub.split(".")) / "__init__.py").exists()
                out.add(sub if is_module else base)
    out.discard(here)
    return out


def import_graph() -> nx.DiGraph:
    g = nx.DiGraph()
    for path in sorted(PACKAGE.rglob("*.py")):
        src = module_name(path)
        g.add_node(src)
        for dst in imported_modules(path):
            g.add_edge(src, dst)
    return g


def test_every_module_has_a_layer() -> None:
    for module in import_graph().nodes:
        layer_of(module)


def test_imports_never_climb_a_layer() -> None:
    g = import_graph()
    climbs = [f"{a} (layer {layer_of(a)}) imports {b} (layer {layer_of(b)})" for a, b in g.edges
              if layer_of(b) > layer_of(a)]
    assert not climbs, "imports that climb a layer:\n" + "\n".join(sorted(climbs))


def test_no_import_cycles() -> None:
    g = import_graph()
    # A package's __init__ re-exporting its own modules is not a cycle of meaning; a module importing its
    # package face back is. Drop parent-package edges from a package to its own submodules.
    h = nx.DiGraph((a, b) for a, b in g.edges if not b.startswith(a + "."))
    cycles = list(nx.simple_cycles(h))
    assert not cycles, "import cycles:\n" + "\n".join(" → ".join([*c, c[0]]) for c in cycles[:10])


@pytest.mark.parametrize("limit", [450])
def test_files_stay_small(limit: int) -> None:
    big = [f"{p.relative_to(PACKAGE.parent)}: {n} lines" for p in sorted(PACKAGE.rglob("*.py"))
           if (n := len(p.read_text(encoding="utf-8").splitlines())) > limit]
    assert not big, f"files over {limit} lines (split them by concern):\n" + "\n".join(big)


def test_the_checks_can_fail() -> None:
    """The parser sees real imports (also inside functions), and an upward edge would be reported."""
    assert "sparsify.prune.select" in imported_modules(PACKAGE / "sparsifier.py")
    assert layer_of("sparsify.graph.trace") < layer_of("sparsify.prune.surgery") < layer_of("sparsify.sparsifier")
    with pytest.raises(AssertionError, match="in no layer"):
        layer_of("sparsify_other.module")
