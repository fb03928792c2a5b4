"""Determinism over the coverage zoo (issue #21): every family's channel graph is the same in separate processes.

    python -m benchmarks.coverage --suite timm|hf|torchvision --determinism [--families a,b] [--jobs N] [--redo]

For each family whose record has a traced graph: build the same tiny model in a fresh subprocess (another hash
seed, other memory), trace and group it (no oracle, no Torch-Pruning) and compare its signature
(``ChannelGraph.signature``) with the one the zoo run recorded. A record without a signature is compared
across two fresh subprocesses instead. Where they differ, one more build locates the first differing group.
Adds ``deterministic`` (and ``determinism`` in words where not simply equal) to each record, the JSON
re-read right before each write so that other fields, and records written meanwhile, stay.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from benchmarks import coverage
from sparsify.testing.determinism import first_difference

ROOT = Path(__file__).resolve().parents[1]


def graph_rows(suite: str, family: str) -> dict[str, Any]:
    """In the child: build ``family``, run it once, randomise and group it (as the zoo run does); its signature
    and rows."""
    from sparsify import build_channel_graph
    from sparsify._compat import import_torchvision
    from sparsify.testing.oracle import randomize_

    import_torchvision()  # before timm / transformers, which import it
    try:
        model, inputs, _ = coverage._build(suite, family, use_cache=False)[1]
        coverage._outputs(model, inputs)  # the zoo run's finiteness check: a model whose forward sets state
        randomize_(model)
        cg = build_channel_graph(model, inputs)
    except Exception as exc:
        return {"family": family, "error": coverage._reason(exc, 300)}
    return {"family": family, "signature": cg.signature(), "rows": cg.signature_rows()}


def build_in_subprocess(suite: str, family: str, timeout: float) -> dict[str, Any]:
    """:func:`graph_rows` in a fresh Python process with a random hash seed (``error`` on failure)."""
    cmd = [sys.executable, "-m", "benchmarks.coverage", "--child", "--determinism", "--suite", suite,
           "--families", family]
    env = {**os.environ, "PYTHONHASHSEED": "random", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"family": family, "error": f"no graph within {timeout:.0f} s"}
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(coverage.MARK):
            return json.loads(line[len(coverage.MARK):])
    tail = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
    return {"family": family, "error": tail[:300]}


def check(suite: str, family: str, recorded: str | None, timeout: float) -> dict[str, Any]:
    """The fields to add to ``family``'s record: ``deterministic`` (+ ``determinism``, the difference), or
    ``determinism_error`` when a build failed (then nothing is concluded)."""
    first = build_in_subprocess(suite, family, timeout)
    if "error" in first:
        return {"determinism_error": first["error"]}
    if recorded is not None and first["signature"] == recorded:
        return {"deterministic": True}
    second = build_in_subprocess(suite, family, timeout)
    if "error" in second:
        return {"determinism_error": second["error"]}
    difference = first_difference(first["rows"], second["rows"])
    if difference:
        return {"deterministic": False, "determinism": f"two fresh processes: {difference}"}
    if recorded is None:
        return {"deterministic": True, "determinism": "two fresh processes agree (no signature recorded)"}
    return {"deterministic": False, "determinism": "two fresh processes agree with each other but not with the "
            "zoo run's recorded signature (or the library changed since the zoo run: re-run the family)"}


def _write(out: Path, family: str, compared: str | None, fields: dict[str, Any], command: str) -> bool:
    """Add ``fields`` to ``family``'s record in the latest ``out``; not when the record was re-run meanwhile."""
    data = json.loads(out.read_text())
    rec = data["models"].get(family)
    if rec is None or rec.get("signature") != compared:
        return False
    for key in ("deterministic", "determinism", "determinism_error"):
        rec.pop(key, None)
    rec.update(fields)
    data["totals"] = coverage.totals(data["models"])
    data["determinism_command"] = command
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(out)
    return True


def to_check(records: dict[str, dict[str, Any]], families: list[str] | None, redo: bool) -> list[str]:
    """The families with a traced graph (``groups`` recorded), not sub-configs, not yet checked unless ``redo``."""
    wanted = families if families is not None else sorted(records)
    return [f for f in wanted if f in records and "groups" in records[f] and not records[f].get("sub_config_of")
            and (redo or "deterministic" not in records[f])]


def run(suite: str, out: Path, families: list[str] | None, jobs: int, timeout: float, command: str,
        redo: bool = False) -> int:
    records = json.loads(out.read_text())["models"]
    todo = to_check(records, families, redo)
    signatures = {f: records[f].get("signature") for f in todo}

    def one(family: str) -> tuple[str, dict[str, Any]]:
        return family, check(suite, family, signatures[family], timeout)

    with ThreadPoolExecutor(max(1, jobs)) as pool:
        for family, fields in pool.map(one, todo):
            kept = _write(out, family, signatures[family], fields, command)
            verdict = fields.get("deterministic", "error")
            print(f"{family:<40} {verdict!s:<6} {fields.get('determinism', fields.get('determinism_error', ''))}"
                  f"{'' if kept else '  (record re-run meanwhile: not written)'}", flush=True)
    print(json.dumps(coverage.totals(json.loads(out.read_text())["models"]).get("deterministic"), indent=1))
    return 0
