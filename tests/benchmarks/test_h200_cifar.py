"""benchmarks/h200/cifar.sh: its groups of runs name real arms and cover the protocol at both targets."""

from __future__ import annotations

import subprocess
from pathlib import Path

from benchmarks.cifar_lib.arms import ARMS

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "h200" / "cifar.sh"


def test_groups_cover_every_protocol_arm_at_both_targets() -> None:
    done = subprocess.run(["bash", str(SCRIPT), "groups"], capture_output=True, text=True, timeout=30,
                          env={"PER_CMD": "4", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    groups = [line.split(": ", 1)[1].split() for line in done.stdout.splitlines()]
    assert groups and all(len(g) <= 4 for g in groups)
    specs = [s for g in groups for s in g]
    assert len(specs) == len(set(specs))
    arms = {s.partition(":")[0] for s in specs}
    assert arms <= set(ARMS), arms - set(ARMS)
    pruning = {a for a, cls in ARMS.items() if cls.prunes and a not in ("l1", "gmp_erk", "torch_pruning")}
    assert {f"{a}:{t}" for a in pruning for t in ("2.13", "4")} <= set(specs)  # torch_pruning: the `tp` command
    assert "dense_ft" in specs
