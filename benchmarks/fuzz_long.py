"""Long fuzzing profile: the property test of tests/testing/test_fuzz.py over many architectures.

    python -m benchmarks.fuzz_long --examples 10000 [--json fuzz_long.json]

(equivalently ``SPARSIFY_FUZZ_EXAMPLES=10000 pytest tests/testing/test_fuzz.py``). Prints a table of outcomes
and writes JSON; a failure stops the run, prints hypothesis' minimal spec, and exits non-zero.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparsify.testing.fuzz import Spec, architectures, check_spec


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=10_000)
    parser.add_argument("--json", type=Path, default=Path("/tmp/fuzz_long.json"))
    parser.add_argument("--max-seconds", type=float, default=float("inf"), help="skip the rest after this")
    parser.add_argument("--random", action="store_true", help="not derandomized: a new draw each run")
    args = parser.parse_args()
    torch.set_num_threads(1)
    outcomes: Counter[str] = Counter()
    start = time.perf_counter()

    @settings(max_examples=args.examples, deadline=None, derandomize=not args.random, database=None,
              suppress_health_check=list(HealthCheck))
    @given(spec=architectures(), seed=st.integers(0, 3))
    def run(spec: Spec, seed: int) -> None:
        if time.perf_counter() - start > args.max_seconds:
            outcomes["not run: time budget spent"] += 1
            return  # a pass, not a rejection: hypothesis may replay it
        for keep_bias in (False, True):
            outcomes[f"keep_bias={keep_bias}: {check_spec(spec, keep_bias, seed)}"] += 1

    failure = None
    try:
        run()
    except Exception as exc:  # hypothesis re-raises the minimal failing example's error
        failure = f"{type(exc).__name__}: {exc}"
    elapsed = time.perf_counter() - start
    checked = sum(n for k, n in outcomes.items() if k.startswith("keep_bias=False"))
    print(f"{'outcome':<55} {'count':>7}")
    for key, n in sorted(outcomes.items()):
        print(f"{key:<55} {n:>7}")
    print(f"architectures checked: {checked} in {elapsed:.0f} s; failure: {failure}")
    args.json.write_text(json.dumps({"examples": args.examples, "checked": checked, "seconds": elapsed,
                                     "outcomes": dict(outcomes), "failure": failure}, indent=2))
    return 1 if failure else 0


if __name__ == "__main__":
    sys.exit(main())
