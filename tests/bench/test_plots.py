"""bench/plots.py: the calls' plot is drawn from what was measured, or not at all."""

from __future__ import annotations

import math
from pathlib import Path

from bench.plots import plot_call_turns
from bench.studies import TurnSeries


def test_call_turns_plot_is_a_png_with_a_line_per_variant(tmp_path: Path) -> None:
    turns = tuple((0.1 * (n + 1),) for n in range(4))
    drawn = [TurnSeries("llama_cpp, prefix reuse", 1, turns), TurnSeries("no reuse", 1, turns)]
    path = tmp_path / "turns.png"
    assert plot_call_turns(drawn, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_nothing_measured_draws_nothing(tmp_path: Path) -> None:
    path = tmp_path / "turns.png"
    assert not plot_call_turns([], path)
    assert not plot_call_turns([TurnSeries("x", 1, ((math.nan,),))], path)
    assert not path.exists()
