"""The offline text corpus: the Python sources of a pinned list of pure-Python wheels from PyPI.

Rebuild it with ``python -m benchmarks.llm_lib.corpus`` (downloads with ``pip download``, then
``benchmarks.llm_lib.tokens`` trains the tokenizer). Every file of every wheel ending in ``.py``,
UTF-8, under 512 KiB and free of NUL bytes is one document. Documents are sorted by
``package/path``; a document is held out when the first byte of ``sha256("package/path")`` is below
``HELDOUT_BYTE`` (≈3 %), so the split is by file and does not move when the list grows.

The carried artefact (``lmdata/corpus/``): ``train.txt.xz`` and ``heldout.txt.xz`` (documents
joined by NUL), ``tokenizer.json`` and ``manifest.json`` (the packages, counts and checksums).
Every package is permissively licensed (BSD, MIT, Apache-2.0 or public domain); see ``PACKAGES``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import subprocess
import sys
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

# (distribution, version, licence): ~32 M characters of Python, ~5 MiB as xz.
PACKAGES: tuple[tuple[str, str, str], ...] = (
    ("django", "5.1.4", "BSD-3-Clause"),
    ("networkx", "3.4.2", "BSD-3-Clause"),
    ("dask", "2024.12.0", "BSD-3-Clause"),
    ("sphinx", "8.1.3", "BSD-2-Clause"),
    ("docutils", "0.21.2", "public domain / BSD-2-Clause"),
    ("pydantic", "2.10.3", "MIT"),
    ("celery", "5.4.0", "BSD-3-Clause"),
    ("pytest", "8.3.4", "MIT"),
    ("rich", "13.9.4", "MIT"),
    ("scrapy", "2.12.0", "BSD-3-Clause"),
    ("alembic", "1.14.0", "MIT"),
    ("werkzeug", "3.1.3", "BSD-3-Clause"),
    ("kombu", "5.4.2", "BSD-3-Clause"),
    ("fastapi", "0.115.6", "MIT"),
    ("boltons", "24.1.0", "BSD-3-Clause"),
    ("jinja2", "3.1.4", "BSD-3-Clause"),
    ("click", "8.1.7", "BSD-3-Clause"),
    ("flask", "3.1.0", "BSD-3-Clause"),
    ("httpx", "0.28.1", "BSD-3-Clause"),
    ("requests", "2.32.3", "Apache-2.0"),
    ("attrs", "24.2.0", "MIT"),
    ("starlette", "0.41.3", "BSD-3-Clause"),
    ("toolz", "1.0.0", "BSD-3-Clause"),
    ("more-itertools", "10.5.0", "MIT"),
)
HELDOUT_BYTE = 8  # of 256: ≈3.1 % of the files
MAX_FILE_BYTES = 512 * 1024  # larger .py files are generated tables, not code
SEPARATOR = "\x00"  # joins documents in the .txt.xz files; never inside a kept document
SPLITS = ("train", "heldout")


@dataclass(frozen=True)
class Document:
    name: str  # "package/path/in/wheel.py"
    text: str


def is_heldout(name: str) -> bool:
    """Whether the file ``name`` belongs to the held-out split (a hash of its name: stable, by file)."""
    return hashlib.sha256(name.encode()).digest()[0] < HELDOUT_BYTE


def download(packages: Iterable[tuple[str, str, str]], dest: Path) -> list[Path]:
    """``pip download`` each pinned pure-Python wheel into ``dest`` (skipped when already there)."""
    dest.mkdir(parents=True, exist_ok=True)
    wheels = []
    for dist, version, _ in packages:
        found = _find_wheel(dest, dist, version)
        if found is None:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                            "--python-version", "3.12", "--implementation", "py", "--abi", "none",
                            "--platform", "any", "-q", "-d", str(dest), f"{dist}=={version}"], check=True)
            found = _find_wheel(dest, dist, version)
        if found is None:
            raise FileNotFoundError(f"pip downloaded no wheel for {dist}=={version} into {dest}")
        wheels.append(found)
    return wheels


def _find_wheel(dest: Path, dist: str, version: str) -> Path | None:
    stem = dist.replace("-", "_").lower()
    for path in sorted(dest.glob("*.whl")):
        name, ver = path.name.split("-")[:2]
        if name.lower() == stem and ver == version:
            return path
    return None


def documents_of_wheel(wheel: Path, package: str) -> Iterator[Document]:
    """The kept ``.py`` files of one wheel (or any zip archive), in archive-path order."""
    with zipfile.ZipFile(wheel) as archive:
        for info in sorted(archive.infolist(), key=lambda i: i.filename):
            if not info.filename.endswith(".py") or info.file_size > MAX_FILE_BYTES:
                continue
            try:
                text = archive.read(info).decode("utf-8")
            except UnicodeDecodeError:
                continue
            text = text.replace("\r\n", "\n")
            if SEPARATOR in text or not text.strip():
                continue
            yield Document(f"{package}/{info.filename}", text)


def split_documents(docs: Iterable[Document]) -> dict[str, list[Document]]:
    """Documents sorted by name, split by ``is_heldout``."""
    out: dict[str, list[Document]] = {split: [] for split in SPLITS}
    for doc in sorted(docs, key=lambda d: d.name):
        out["heldout" if is_heldout(doc.name) else "train"].append(doc)
    return out


def write_split(docs: list[Document], path: Path) -> None:
    """Documents joined by ``SEPARATOR``, xz-compressed (preset 9, deterministic)."""
    data = SEPARATOR.join(d.text for d in docs).encode("utf-8")
    path.write_bytes(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME))


def read_split(path: Path) -> list[str]:
    """The documents of one ``.txt.xz`` split file."""
    return lzma.decompress(path.read_bytes()).decode("utf-8").split(SEPARATOR)


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build_corpus(wheels: list[tuple[Path, str]], out: Path, *, vocab_size: int = 8192) -> dict:
    """Write the two splits, train the tokenizer on the train split, write and return the manifest."""
    from benchmarks.llm_lib.tokens import train_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    docs = [doc for wheel, package in wheels for doc in documents_of_wheel(wheel, package)]
    splits = split_documents(docs)
    manifest: dict = {"packages": [{"name": n, "version": v, "license": lic} for n, v, lic in PACKAGES
                                   if n in {p for _, p in wheels}],
                      "heldout_rule": f"sha256('package/path')[0] < {HELDOUT_BYTE}", "splits": {}}
    for split, split_docs in splits.items():
        path = out / f"{split}.txt.xz"
        write_split(split_docs, path)
        manifest["splits"][split] = {"files": len(split_docs), "chars": sum(len(d.text) for d in split_docs),
                                     "xz_bytes": path.stat().st_size, "sha256": sha256_file(path)}
    tokenizer = train_tokenizer([d.text for d in splits["train"]], vocab_size=vocab_size)
    tokenizer.save(str(out / "tokenizer.json"))
    manifest["tokenizer"] = {"kind": "byte-level BPE", "vocab_size": tokenizer.get_vocab_size(),
                             "sha256": sha256_file(out / "tokenizer.json")}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("lmdata/corpus"), help="the carried artefact")
    parser.add_argument("--downloads", type=Path, default=Path("lmdata/downloads"), help="the wheels (not carried)")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--no-tokens", action="store_true", help="skip the token cache beside the folder")
    args = parser.parse_args(argv)
    wheels = download(PACKAGES, args.downloads)
    manifest = build_corpus([(w, name) for w, (name, _, _) in zip(wheels, PACKAGES, strict=True)], args.out,
                            vocab_size=args.vocab_size)
    for split, info in manifest["splits"].items():
        print(f"{split:8s} files {info['files']:6d}  chars {info['chars']:>11,}  xz {info['xz_bytes'] / 2**20:.2f} MiB")
    if not args.no_tokens:
        from benchmarks.llm_lib.tokens import load_tokens

        tokens = load_tokens(args.out)
        for split, array in tokens.items():
            print(f"{split:8s} tokens {len(array):>11,}")
    carried = sum(p.stat().st_size for p in args.out.iterdir())
    print(f"carried: {carried / 2**20:.2f} MiB in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
