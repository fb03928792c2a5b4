"""The documentation stays inside the repository: no dead relative link, no reference to ``../shared``.

Every relative link (and ``#anchor`` into a Markdown file) in README.md, docs/**/*.md and benchmarks/**/*.md
must resolve to a file of this repository; users have only the repository, so no text or code may point at
the ``shared`` folder beside it.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SKIP_DIRS = {"build", "dist", "data", "node_modules", "__pycache__"}
TEXT_SUFFIXES = {".md", ".py", ".toml", ".sh", ".cfg", ".txt", ".yml", ".yaml", ".json"}
OUTSIDE_REFERENCE = re.compile(  # "../shared", "/work/shared", or a path join such as ROOT.parent / "shared"
    r"(?:\.\./)+" + "shared" + r"\b|/work/" + "shared" + r"\b|\.parent\s*/\s*[\"']" + "shared" + r"[\"']"
)

_FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.MULTILINE | re.DOTALL)
_INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1", re.DOTALL)
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_REFERENCE = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.MULTILINE)
_HTML = re.compile(r"""(?:href|src)\s*=\s*["']([^"']+)["']""")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
_HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$", re.MULTILINE)


def markdown_files() -> list[Path]:
    files = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")), *sorted((ROOT / "benchmarks").rglob("*.md"))]
    return [f for f in files if f.is_file()]


def _strip_code(text: str) -> str:
    return _INLINE_CODE.sub("", _FENCE.sub("", text))


def links(text: str) -> list[str]:
    """Link targets of a Markdown text (inline, reference-style and HTML), code spans and blocks excluded."""
    prose = _strip_code(text)
    return [m.group(1) for pattern in (_LINK, _REFERENCE, _HTML) for m in pattern.finditer(prose)]


def heading_anchors(text: str) -> set[str]:
    """The ``#anchors`` GitHub gives the headings of a Markdown text (duplicates numbered -1, -2, ...)."""
    anchors: set[str] = set()
    for m in _HEADING.finditer(_FENCE.sub("", text)):
        title = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", m.group(2)).replace("`", "")
        slug = re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")
        candidate, n = slug, 0
        while candidate in anchors:
            n += 1
            candidate = f"{slug}-{n}"
        anchors.add(candidate)
    return anchors


def dead_links(md: Path, root: Path = ROOT) -> list[str]:
    """Every relative link of ``md`` that leaves ``root``, names no existing file or names a missing anchor."""
    text = md.read_text(encoding="utf-8")
    problems = []
    for target in links(text):
        if _SCHEME.match(target):
            continue  # http(s), mailto: not checked here
        path_part, _, anchor = target.partition("#")
        dest = (md.parent / path_part).resolve() if path_part else md.resolve()
        if not dest.is_relative_to(root.resolve()):
            problems.append(f"{target}: points outside the repository")
        elif not dest.exists():
            problems.append(f"{target}: no such file ({dest.relative_to(root.resolve())})")
        elif anchor and dest.suffix == ".md" and anchor not in heading_anchors(dest.read_text(encoding="utf-8")):
            problems.append(f"{target}: no heading with anchor #{anchor} in {dest.name}")
    return problems


def outside_references(root: Path = ROOT) -> list[str]:
    """``file:line`` of every text file under ``root`` that mentions the ``shared`` folder beside the repo."""
    hits = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if path.suffix not in TEXT_SUFFIXES or not path.is_file() or path == Path(__file__).resolve():
            continue
        if any(part.startswith(".") or part in SKIP_DIRS or part.endswith(".egg-info") for part in rel.parts[:-1]):
            continue
        for lineno, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if OUTSIDE_REFERENCE.search(line):
                hits.append(f"{rel}:{lineno}: {line.strip()}")
    return hits


@pytest.mark.parametrize("md", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(md: Path) -> None:
    problems = dead_links(md)
    assert not problems, f"dead links in {md.relative_to(ROOT)} (fix the path or drop the link):\n" + "\n".join(
        problems
    )


def test_no_reference_outside_the_repository() -> None:
    hits = outside_references()
    assert not hits, (
        "these lines refer to the shared folder outside the repository, which users do not have; "
        "point at a file of the repository instead:\n" + "\n".join(hits)
    )


def test_checker_finds_dead_links_and_anchors(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "b.md").write_text("# Title: `x_y` — ok\n\n## Title: x_y — ok\n")
    page = tmp_path / "docs" / "a.md"
    page.write_text(
        "[ok](b.md) [ok](b.md#title-x_y--ok) [ok](b.md#title-x_y--ok-1) [web](https://example.org/x)\n"
        "[dead](missing.md) [bad anchor](b.md#nope) [out](../../elsewhere.md)\n"
        "`[in code](missing2.md)`\n```\n[in a block](missing3.md)\n```\n[ref]: gone.md\n"
    )
    problems = dead_links(page, root=tmp_path)
    assert [p.split(":")[0] for p in problems] == ["missing.md", "b.md#nope", "../../elsewhere.md", "gone.md"]


def test_checker_finds_outside_references(tmp_path: Path) -> None:
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "a.py").write_text('x = 1\npath = "../' + 'shared/data/x.npz"\n')
    (tmp_path / "pkg" / "b.py").write_text('DATA = ROOT.parent / "' + 'shared" / "x.npz"\nOK = ROOT / "shared_x"\n')
    (tmp_path / ".venv").mkdir()
    (tmp_path / ".venv" / "b.py").write_text('"../' + 'shared/ignored"\n')
    assert outside_references(tmp_path) == [
        'pkg/a.py:2: path = "../' + 'shared/data/x.npz"',
        'pkg/b.py:1: DATA = ROOT.parent / "' + 'shared" / "x.npz"',
    ]
