"""benchmarks.speed_compare: rows of separate speed runs matched, spread and goals computed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.speed_compare import compare, main


def row(arm: str, speedup: float, reduction: float, target: float | None = 2.0, latency: float | None = None,
        b1: float = 1.1, error: str = "") -> dict:
    return {"model": "resnet50", "target": target, "arm": arm, "speedup": speedup, "reduction": reduction,
            "realised": speedup / reduction, "small_batch_speedup": {"1": b1}, "error": error,
            "info": {"target_speedup": latency} if latency else {}}


def run(scale: float, b1: float = 1.1) -> dict:
    return {"device": "NVIDIA H200", "rows": [
        row("dense", 1.0, 1.0, target=None), row("ours+latency", 1.6 * scale, 2.0),
        row("ours@2x", 1.92 * scale, 3.1, target=None, latency=2.0, b1=b1),
        row("tp", 0.5, 2.1, error="")]}


def test_spread_target_and_never_slower_per_row() -> None:
    records = {r["arm"]: r for r in compare([run(1.0), run(1.02, b1=0.9)])}
    assert records["ours+latency"]["spread_of"] == "realised"
    assert records["ours+latency"]["spread"] == pytest.approx(0.032 / 1.616, rel=1e-6)
    assert records["ours+latency"]["spread_ok"] and records["ours+latency"]["never_slower"]
    assert records["ours@2x"]["spread_of"] == "speedup" and records["ours@2x"]["target_met_every_run"]
    assert not records["ours@2x"]["never_slower"]  # batch 1 at 0.9× dense in the second run
    assert not records["tp"]["never_slower"] and "target_met_every_run" not in records["tp"]


def test_a_row_missing_or_failed_in_one_run_is_left_out_and_a_miss_is_reported() -> None:
    second = run(0.9)
    second["rows"][1]["error"] = "ValueError: ..."
    records = {r["arm"]: r for r in compare([run(1.0), second])}
    assert "ours+latency" not in records
    assert not records["ours@2x"]["target_met_every_run"]  # 1.728× < 0.95 × 2
    assert not records["ours@2x"]["spread_ok"]  # 10 % apart


def test_cli_writes_json(tmp_path: Path) -> None:
    paths = []
    for k, scale in enumerate((1.0, 1.01)):
        paths.append(tmp_path / f"run{k}.json")
        paths[-1].write_text(json.dumps(run(scale)))
    main([*map(str, paths), "--out", str(tmp_path / "c.json")])
    saved = json.loads((tmp_path / "c.json").read_text())
    assert saved["cards"] == ["NVIDIA H200"] and len(saved["rows"]) == 4
    with pytest.raises(SystemExit):
        main([str(paths[0])])
