"""bench/numerics.py: the NUMERICS.md report of one run (rendering only)."""

from __future__ import annotations

from typing import Any

from bench.numerics import render


def result(auto_chooses: str | None) -> dict[str, Any]:
    row = {
        "candidate": "int8 (CT2_USE_MKL=0)",
        "runs_as": "int8_float32",
        "nll_ratio": 1.059,
        "agreement": 0.484,
        "agreement_ratio": 0.682,
        "equal_answers": "3/16",
        "batch_tok_s": 88.9,
        "single_tok_s": 23.4,
        "faithful": auto_chooses is not None,
    }
    return {
        "load_plain_s": 0.5,
        "load_checked_s": 2.5,
        "first_auto_measurement_s": 60.0,
        "verdict_reuse_s": 0.002,
        "speed_vs_fastest_faithful": None if auto_chooses is None else 1.0,
        "repeats": 3,
        "summary": {
            "machine": {"cpu_model": "Test CPU", "ctranslate2": "4.8.5"},
            "bounds": {"max_nll_ratio": 1.25, "min_agreement_ratio": 0.6},
            "reference": {"nll": 0.677, "anchor_nll": 0.683, "anchor_agreement": 0.71},
            "candidates": [row],
            "auto_chooses": auto_chooses,
            "speed_vs_fastest": None if auto_chooses is None else 0.68,
            "threads": {
                "usable_cpus": 2,
                "single_tok_s_by_intra_threads": {1: 23.7, 2: 21.1},
                "inter_threads": 2,
                "intra_threads": 1,
            },
        },
    }


def test_report_states_costs_as_seconds_and_ratios_and_the_choice() -> None:
    text = render(result("int8 (CT2_USE_MKL=0)"), "make bench")
    assert "Written by `make bench`" in text
    assert "| load float32 with the check at load | 2.50 | 5.00x (check: 2.00 s) |" in text
    assert "| auto's first measurement on this machine | 60.0 | 120x a plain load |" in text
    assert "auto serves **int8 (CT2_USE_MKL=0)**: 0.68x the batched speed of the fastest" in text
    assert "1.00x the fastest faithful one (goal >= 0.9x)" in text
    assert "| int8 (CT2_USE_MKL=0) | int8_float32 | 1.059 | 0.484 | 0.682 | 3/16 |" in text
    assert "inter_threads=2, intra_threads=1" in text


def test_report_says_when_nothing_is_faithful() -> None:
    text = render(result(None), "make bench")
    assert "auto serves **nothing**: no candidate is faithful here." in text
    assert "| no |" in text
