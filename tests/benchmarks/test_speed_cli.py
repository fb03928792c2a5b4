"""benchmarks/speed.py's command line: flags given on the command line override the preset's."""

from __future__ import annotations

import sys

import pytest

from benchmarks import speed


def test_command_line_flags_override_the_preset(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """Regression: with ``main()`` reading sys.argv, ``--preset h200 --out F`` dropped ``--out`` and every
    other flag (the H200 run wrote no JSON and ignored its ``--time-budget``)."""
    out = tmp_path / "speed.json"
    monkeypatch.setattr(sys, "argv", ["speed.py", "--preset", "h200", "--time-budget", "470", "--out", str(out)])
    args = speed.parse(None)
    assert args.out == out and args.time_budget == 470
    assert args.models == ["resnet50", "mobilenet_v2", "vit_b_16"]  # the preset's own flags still apply
