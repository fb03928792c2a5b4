"""The coverage zoo's determinism mode (benchmarks.coverage_determinism): each family's recorded graph signature
is compared with a build in another process; a family whose graph changes between processes is caught."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from benchmarks import coverage, coverage_determinism, coverage_report
from sparsify import build_channel_graph

HERE = "tests.benchmarks.test_coverage_determinism"
STABLE, UNSTABLE = f"{HERE}:stable_family", f"{HERE}:process_dependent_family"
COUNTER = "SPARSIFY_TEST_BUILD_COUNTER"


def _mlp(hidden: int) -> tuple[str, tuple[nn.Module, torch.Tensor, list[nn.Module]]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, hidden), nn.ReLU(), nn.Linear(hidden, 3)).double()
    return f"mlp_{hidden}", (model, torch.randn(2, 4, dtype=torch.float64), [])


def stable_family() -> tuple[str, tuple[nn.Module, torch.Tensor, list[nn.Module]]]:
    return _mlp(8)


def process_dependent_family() -> tuple[str, tuple[nn.Module, torch.Tensor, list[nn.Module]]]:
    """A builder that differs on every call: its width counts the builds so far (in the file ``$COUNTER``)."""
    path = Path(os.environ[COUNTER])
    builds = int(path.read_text()) if path.exists() else 0
    path.write_text(str(builds + 1))
    return _mlp(8 + builds)


def test_the_zoo_record_carries_the_graph_signature() -> None:
    rec = coverage.check_ours(stable_family()[1])
    assert rec["result"] == "exact"
    assert rec["signature"] == build_channel_graph(*stable_family()[1][:2]).signature()
    assert rec["signature"] != build_channel_graph(*_mlp(9)[1][:2]).signature()


def test_determinism_mode_marks_the_same_graph_deterministic_and_a_changing_one_not(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(COUNTER, str(tmp_path / "builds"))
    stable = coverage.check_family("torchvision", STABLE, torch_pruning=False)  # the zoo run's record
    unstable = {"family": UNSTABLE, "groups": 1, "result": "exact", "rel_error": 0.0}  # run before signatures
    error = {"family": "traced_badly", "result": "error", "reason": "x"}
    out = tmp_path / "coverage_torchvision.json"
    out.write_text(json.dumps({"command": "c", "models": {STABLE: stable, UNSTABLE: unstable, "traced_badly": error}}))

    coverage_determinism.run("torchvision", out, None, jobs=1, timeout=120, command="determinism")

    data = json.loads(out.read_text())
    models = data["models"]
    assert models[STABLE] == {**stable, "deterministic": True}  # the other fields untouched
    assert models[UNSTABLE]["deterministic"] is False
    assert "two fresh processes: group" in models[UNSTABLE]["determinism"]
    assert "differs in ['width'" in models[UNSTABLE]["determinism"]
    assert models["traced_badly"] == error  # no graph: not checked
    assert data["totals"]["deterministic"] == {"checked": 2, "same": 1, "differ": [UNSTABLE]}
    assert data["command"] == "c" and data["determinism_command"] == "determinism"


def test_a_recorded_signature_that_no_fresh_build_gives_is_not_deterministic(tmp_path: Path) -> None:
    fields = coverage_determinism.check("torchvision", STABLE, "0" * 64, timeout=120)
    assert fields["deterministic"] is False and "not with the zoo run's recorded signature" in fields["determinism"]


def test_the_report_counts_and_marks_determinism(tmp_path: Path) -> None:
    models = {"a": {"family": "a", "groups": 1, "exact": 1, "result": "exact", "deterministic": True},
              "b": {"family": "b", "groups": 1, "exact": 1, "result": "exact", "deterministic": False,
                    "determinism": "two fresh processes: group 'x' differs in ['members']"},
              "c": {"family": "c", "groups": 1, "exact": 1, "result": "exact"}}
    machine = dict.fromkeys(("platform", "cpus", "torch", "timm", "transformers", "torchvision", "torch-pruning"), "?")
    (tmp_path / "coverage_timm.json").write_text(json.dumps(
        {"command": "c", "date": "d", "machine": machine, "totals": coverage.totals(models), "models": models}))
    page = coverage_report.render(tmp_path)
    assert "the same channel graph in two processes: 1 of 2 checked; differs: b" in page
    assert "| exact | — | no: two fresh processes: group 'x' differs in ['members'] |" in page
    assert "| exact | — | yes |" in page and "| exact | — | not checked |" in page
