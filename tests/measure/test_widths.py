"""WidthTable renders as text."""

from __future__ import annotations

from sparsify.measure.widths import WidthTable


def test_width_table_prints_as_a_text_table() -> None:
    table = WidthTable("conv1x1", "cpu", {}, {8: 1.0, 16: 1.5}, scores={1: 1.25, 8: 1.5}, suggested=1)
    text = str(table)
    assert "rich.table" not in text and "suggested round_to=1" in text
    assert "1.2500" in text and "1.200×" in text  # the 8-row: 1.5 / 1.25
