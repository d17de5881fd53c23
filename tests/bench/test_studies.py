"""bench/studies.py: the study scenarios' tables and the calls' plot series."""

from __future__ import annotations

import math

import pytest

from bench.studies import (
    LORA_COLUMNS,
    STRUCTURED_COLUMNS,
    TURN_SUMMARY_COLUMNS,
    LoraRun,
    StructuredLevel,
    Studies,
    TurnSeries,
    lora_rows,
    structured_rows,
    study_tables,
    tail_growth,
    turn_growth,
    turn_percentiles,
    turn_plot_series,
    turn_summary_rows,
    turn_table,
)


def series(variant: str, per_turn: list[list[float]], calls: int = 2) -> TurnSeries:
    return TurnSeries(variant, calls, tuple(tuple(t) for t in per_turn), 300, 1000, 3 * 2**20)


# Six turns, two calls each, seconds: slow first turn, flat afterwards, then growth.
GROWING = [[0.2, 0.4], [0.1, 0.1], [0.1, 0.1], [0.2, 0.2], [0.3, 0.3], [0.4, 0.6]]


def test_turn_percentiles_are_per_turn_in_milliseconds() -> None:
    p50 = turn_percentiles(series("x", GROWING), 50)
    assert p50 == pytest.approx([300.0, 100.0, 100.0, 200.0, 300.0, 500.0])
    p95 = turn_percentiles(series("x", GROWING), 95)
    assert p95[0] is not None and math.isclose(p95[0], 390.0)


def test_a_turn_without_a_first_token_is_infinitely_slow() -> None:
    p50 = turn_percentiles(series("x", [[0.1, math.nan]]), 50)
    assert p50 == [math.inf]


def test_growth_is_the_slowest_last_turn_over_the_median_of_the_first_three() -> None:
    assert turn_growth([300.0, 100.0, 100.0, 200.0, 300.0, 500.0]) == 5.0
    assert turn_growth([100.0] * 5) is None  # no first three and last three apart
    assert turn_growth([100.0, None, 100.0, 100.0, 100.0, 100.0]) is None


def test_tail_growth_is_the_slowest_of_the_last_four_over_the_slowest_of_the_first_three() -> None:
    assert tail_growth([100.0, 300.0, 200.0, 100.0, 600.0, 100.0, 100.0]) == 2.0
    assert tail_growth([100.0] * 6) is None  # the first three and the last four overlap
    assert tail_growth([100.0] * 6 + [None]) is None


def test_turn_table_has_a_row_per_turn_and_a_column_per_variant() -> None:
    header, rows = turn_table([series("reuse", GROWING), series("no reuse", GROWING[:3])])
    assert header == ("turn", "reuse, 2 calls p50 / p95 ms", "no reuse, 2 calls p50 / p95 ms")
    assert len(rows) == 6
    assert rows[0] == ["1", "300 / 390", "300 / 390"]
    assert rows[5] == ["6", "500 / 590", "–"]  # the shorter series has no sixth turn


def test_summary_gives_growth_reuse_memory_and_the_verdict() -> None:
    flat = [[0.1, 0.1]] * 6
    rows = turn_summary_rows([series("reuse", flat), series("no reuse", GROWING)])
    assert len(rows[0]) == len(TURN_SUMMARY_COLUMNS)
    assert rows[0] == ["reuse", "2", "1.00×", "–", "300 / 1,000", "3.0", "met"]
    assert rows[1][2] == "5.00×" and rows[1][-1] == "MISSED"
    seven = turn_summary_rows([series("reuse", [[0.1, 0.1]] * 3 + [[0.2, 0.2]] * 4)])
    assert seven[0][2:4] == ["2.00×", "2.00×"]
    peer = TurnSeries("llama.cpp server, cache_prompt", 1, tuple((0.1,) for _ in range(6)))
    assert turn_summary_rows([peer])[0][4:6] == ["–", "–"]  # the peer has no counters


def test_plot_series_are_one_line_per_variant_with_finite_points_only() -> None:
    lines = turn_plot_series([series("reuse", [[0.1, 0.1], [math.nan, 0.2], [0.3, 0.3]], 2)])
    assert len(lines) == 1
    label, turns, ttft_ms = lines[0]
    assert (label, turns) == ("reuse, 2 calls", [1, 3])
    assert ttft_ms == pytest.approx([100.0, 300.0])
    assert turn_plot_series([series("x", [[math.nan]])]) == []


def test_structured_rows_are_ratios_of_constrained_over_free() -> None:
    rows = structured_rows(
        [
            StructuredLevel("transformers", 1, 20.0, 19.0, 0.1, 0.1),
            StructuredLevel("llama_cpp", 16, 200.0, 150.0, 0.2, 0.3),
            StructuredLevel("llama_cpp", 1, 50.0, 50.0, 0.05, 0.05),
        ]
    )
    order = [row[:2] for row in rows]
    assert order == [["llama_cpp", "1"], ["llama_cpp", "16"], ["transformers", "1"]]
    assert len(rows[1]) == len(STRUCTURED_COLUMNS)
    assert rows[1] == ["llama_cpp", "16", "200.0", "150.0", "0.75×", "200.0", "300.0", "1.50×"]


def test_lora_row_is_the_mix_over_the_base_against_the_goal() -> None:
    rows = lora_rows([LoraRun(16, 64, 100.0, 85.0), LoraRun(16, 64, 100.0, 70.0)])
    assert len(rows[0]) == len(LORA_COLUMNS)
    assert rows[0][-2:] == ["0.85×", "met"]
    assert rows[1][-2:] == ["0.70×", "MISSED"]
    assert lora_rows([LoraRun(4, 8, 0.0, 1.0)])[0][-2:] == ["–", "n/a"]


def test_study_tables_name_only_what_was_measured() -> None:
    assert study_tables(Studies()) == []
    studies = Studies(lora=[LoraRun(16, 64, 100.0, 90.0)])
    assert studies.measured()
    assert [title for title, _, _ in study_tables(studies)] == [
        "LoRA (llama_cpp): 4 adapters in the mix vs the base"
    ]
    studies.call_turns.append(series("reuse", GROWING))
    assert len(study_tables(studies)) == 3  # the by-turn table and the summary first
