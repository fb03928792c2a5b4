"""Every ```python block of README.md and docs/*.md runs as written (issue #17).

A page's blocks run in order in one namespace (a later block may use the names of an earlier one), in a
fresh Python process per page (so registrations in one page do not leak into another), from an empty
working directory. A block that cannot run on a CPU machine is marked just before it with a visible comment,
``<!-- snippet: skip — why -->``; a skip without a reason fails. ``docs/results/`` (measured output) and
``benchmarks/HISTORY.md`` are not collected.

Run one page by hand: ``python tests/test_doc_snippets.py docs/extending.md``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGE_TIMEOUT_S = 240
_OPEN = re.compile(r"^```python\s*$")
_CLOSE = re.compile(r"^```\s*$")
_SKIP = re.compile(r"^<!--\s*snippet:\s*skip\b(.*?)-->\s*$")
_ANY_SKIP = re.compile(r"^\s*<!--\s*snippet:", re.IGNORECASE)  # a marker line (not one quoted in prose)


@dataclass(frozen=True)
class Snippet:
    """One ```python block: where it starts (1-based line of its first code line) and its skip reason."""

    page: Path
    line: int
    code: str
    skip: str | None = None  # None: runs; otherwise the reason given in the marker ("" if none was)


def doc_pages(root: Path = ROOT) -> list[Path]:
    """README.md and the pages directly in docs/ (not docs/results/: those record measurements)."""
    return [p for p in [root / "README.md", *sorted((root / "docs").glob("*.md"))] if p.is_file()]


def snippets(page: Path) -> list[Snippet]:
    """The ```python blocks of ``page``, each with the skip marker of the line just before it (if any).

    Raises ValueError for a skip marker that is not right before a ```python block, or a block left open."""
    lines = page.read_text(encoding="utf-8").splitlines()
    out: list[Snippet] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if _ANY_SKIP.search(line):
            marker = _SKIP.match(line.strip())
            if marker is None or i + 1 >= len(lines) or not _OPEN.match(lines[i + 1]):
                raise ValueError(f"{page.name}:{i + 1}: a snippet skip marker must be a line of its own, "
                                 "`<!-- snippet: skip — reason -->`, right before a ```python block")
        if _OPEN.match(line):
            start = i + 1
            end = next((j for j in range(start, len(lines)) if _CLOSE.match(lines[j])), None)
            if end is None:
                raise ValueError(f"{page.name}:{i + 1}: ```python block is never closed")
            marker = _SKIP.match(lines[i - 1].strip()) if i > 0 else None
            skip = None if marker is None else marker.group(1).strip().lstrip("—–-:").strip()
            out.append(Snippet(page, start + 1, "\n".join(lines[start:end]) + "\n", skip))
            i = end
        i += 1
    return out


def run_page(page: Path) -> int:
    """Run the page's blocks that are not skipped, in order, in one namespace; returns how many ran.

    Tracebacks name the Markdown file and its line numbers."""
    try:  # as in tests/conftest.py: a CUDA torchvision build must import on a CPU-only torch
        from sparsify._compat import import_torchvision

        import_torchvision()
    except ModuleNotFoundError:
        pass
    main = types.ModuleType("__main__")  # a fresh __main__, as for a pasted script (pydantic resolves names there)
    main.__file__ = str(page)
    saved, sys.modules["__main__"] = sys.modules["__main__"], main
    ran = 0
    try:
        for s in snippets(page):
            if s.skip is None:
                exec(compile("\n" * (s.line - 1) + s.code, str(page), "exec"), main.__dict__)
                ran += 1
    finally:
        sys.modules["__main__"] = saved
    return ran


PAGES = [p for p in doc_pages() if any(s.skip is None for s in snippets(p))]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_page_snippets_run_as_written(page: Path, tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONWARNINGS="ignore", MPLBACKEND="Agg")
    if os.environ.get("PYTEST_XDIST_WORKER"):
        env["OMP_NUM_THREADS"] = "1"  # one process per core, as tests/conftest.py sets for the workers
    proc = subprocess.run([sys.executable, __file__, str(page)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=PAGE_TIMEOUT_S)
    assert proc.returncode == 0, (f"a ```python block of {page.relative_to(ROOT)} fails as written (the traceback "
                                  f"names the line):\n{proc.stderr[-6000:]}")
    assert f"ran {sum(s.skip is None for s in snippets(page))} snippets" in proc.stdout


def test_every_skip_gives_a_reason() -> None:
    skipped = [s for p in doc_pages() for s in snippets(p) if s.skip is not None]
    missing = [f"{s.page.relative_to(ROOT)}:{s.line}" for s in skipped if not s.skip]
    assert not missing, "write why each block cannot run here: `<!-- snippet: skip — reason -->`: " + ", ".join(missing)
    total = sum(len(snippets(p)) for p in doc_pages())
    assert len(skipped) <= total // 4, f"{len(skipped)} of {total} snippets are skipped: make them small instead"


def test_collector_reads_blocks_markers_and_namespaces(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("# t\n```python\nx = 1\n```\n<!-- snippet: skip — needs CUDA -->\n```python\nraise SystemExit\n"
                    "```\n<!-- snippet: skip -->\n```python\npass\n```\n```bash\nexit 1\n```\n```python\n"
                    "assert x == 1\ny = undefined_name\n```\n")
    found = snippets(page)
    assert [(s.line, s.skip) for s in found] == [(3, None), (7, "needs CUDA"), (11, ""), (17, None)]
    with pytest.raises(NameError) as info:  # the skipped blocks did not run; the namespace is shared
        run_page(page)
    assert info.traceback[-1].lineno + 1 == 18 and str(info.traceback[-1].path) == str(page)
    page.write_text("Mark a block with `<!-- snippet: skip — reason -->`.\n")
    assert snippets(page) == []  # quoted in prose: not a marker
    for stray in ("<!-- snippet: skip — stray -->\n\ntext\n", "<!-- snippet: skipping -->\n```python\npass\n```\n"):
        page.write_text(stray)
        with pytest.raises(ValueError, match="right before a ```python block"):
            snippets(page)


if __name__ == "__main__":
    n = run_page(Path(sys.argv[1]).resolve())
    print(f"ran {n} snippets")
