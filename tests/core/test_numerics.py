"""The numerics judgement: agreement, bounds, the fastest faithful choice (pure)."""

from __future__ import annotations

import json

import pytest

from llm_local.core.numerics import (
    Anchor,
    Bounds,
    Measurement,
    NumericsStatus,
    ProbeItem,
    Reference,
    candidate_label,
    choose,
    greedy_agreement,
    judge,
)

REFERENCE = Reference(
    probe_version=1,
    max_new_tokens=8,
    items=(ProbeItem((1, 2), (10, 11, 12, 13)), ProbeItem((3,), (20, 21))),
    nll=0.5,
    anchor=Anchor(nll=0.52, agreement=0.8),
)
BOUNDS = Bounds(max_nll_ratio=1.25, min_agreement_ratio=0.6)


def measurement(
    compute_type: str = "int8",
    *,
    nll: float = 0.52,
    agreement: float = 0.8,
    batch: float = 100.0,
    single: float = 20.0,
    env: dict[str, str] | None = None,
) -> Measurement:
    return Measurement(
        compute_type=compute_type,
        effective_type=compute_type,
        nll=nll,
        agreement=agreement,
        equal_answers=1,
        batch_tokens_per_s=batch,
        single_tokens_per_s=single,
        load_seconds=0.1,
        env=env or {},
    )


def test_agreement_is_the_share_of_each_reference_answer_reproduced_before_a_difference() -> None:
    reference = [(1, 2, 3, 4), (5, 6)]
    assert greedy_agreement(reference, [(1, 2, 3, 4), (5, 6)]) == (1.0, 2)
    assert greedy_agreement(reference, [(1, 2, 9, 4), (7, 6)]) == (0.25, 0)
    # Stopping early loses what was not said; running on past the reference's end does not.
    assert greedy_agreement(reference, [(1, 2), (5, 6, 7)]) == (0.75, 0)


def test_agreement_refuses_mismatched_or_empty_answer_lists() -> None:
    with pytest.raises(ValueError, match="2 candidate answers for 1"):
        greedy_agreement([(1,)], [(1,), (2,)])
    with pytest.raises(ValueError, match="no answers"):
        greedy_agreement([], [])


def test_an_empty_reference_answer_agrees_only_with_an_empty_answer() -> None:
    assert greedy_agreement([()], [()]) == (1.0, 1)
    assert greedy_agreement([()], [(4,)]) == (0.0, 0)


def test_a_healthy_quantization_passes_with_its_ratios() -> None:
    verdict = judge(measurement(nll=0.55, agreement=0.6), REFERENCE, BOUNDS)
    assert verdict.passed
    assert verdict.reason is None
    assert verdict.nll_ratio == pytest.approx(1.1)
    assert verdict.agreement_ratio == pytest.approx(0.75)


def test_a_broken_kernel_fails_on_nll_naming_the_bound_and_its_setting() -> None:
    verdict = judge(measurement("int16", nll=2.25), REFERENCE, BOUNDS)
    assert not verdict.passed
    assert verdict.nll_ratio == pytest.approx(4.5)
    assert verdict.reason is not None
    assert verdict.reason.startswith("int16: ")
    assert "NLL ratio 4.500 above the bound 1.25 (numerics.max_nll_ratio)" in verdict.reason


def test_flipped_answers_fail_on_agreement_relative_to_float32_on_the_same_weights() -> None:
    verdict = judge(measurement(agreement=0.4), REFERENCE, BOUNDS)
    assert not verdict.passed
    assert verdict.agreement_ratio == pytest.approx(0.5)
    assert verdict.reason is not None
    assert "0.50 of float32's 0.80, below the bound 0.6 (numerics.min_agreement_ratio)" in (
        verdict.reason
    )


def test_an_anchor_that_reproduces_nothing_leaves_the_judgement_to_nll() -> None:
    reference = Reference(1, 8, REFERENCE.items, 0.5, Anchor(nll=0.6, agreement=0.0))
    assert judge(measurement(agreement=0.0), reference, BOUNDS).passed


def test_choose_takes_the_fastest_candidate_that_passes() -> None:
    fast_but_flipped = measurement("int8", agreement=0.2, batch=300)
    faithful_int8 = measurement("int8", batch=200, env={"CT2_USE_MKL": "0"})
    float32 = measurement("float32", nll=0.51, batch=50)
    choice = choose([float32, fast_but_flipped, faithful_int8], REFERENCE, BOUNDS)
    assert choice.chosen == faithful_int8
    assert choice.fastest == fast_but_flipped
    assert [m.batch_tokens_per_s for m, _ in choice.ranked] == [300, 200, 50]
    assert [j.passed for _, j in choice.ranked] == [False, True, True]


def test_choose_ranks_equal_batched_speeds_by_the_one_stream_speed() -> None:
    slow_single = measurement("int8", batch=100, single=10)
    fast_single = measurement("int8_float32", batch=100, single=30)
    assert choose([slow_single, fast_single], REFERENCE, BOUNDS).chosen == fast_single


def test_choose_says_none_when_nothing_passes() -> None:
    choice = choose([measurement(nll=5.0)], REFERENCE, BOUNDS)
    assert choice.chosen is None
    assert choice.fastest is not None


def test_candidates_are_labelled_with_their_kernel_environment() -> None:
    assert candidate_label("int8", {}) == "int8"
    assert candidate_label("int8", {"CT2_USE_MKL": "0"}) == "int8 (CT2_USE_MKL=0)"
    assert measurement(env={"CT2_USE_MKL": "0"}).label == "int8 (CT2_USE_MKL=0)"


def test_reference_and_measurement_survive_json() -> None:
    assert Reference.from_json(json.loads(json.dumps(REFERENCE.to_json()))) == REFERENCE
    original = measurement(env={"CT2_USE_MKL": "0"})
    assert Measurement.from_json(json.loads(json.dumps(original.to_json()))) == original


def test_a_reference_without_items_is_refused() -> None:
    data = REFERENCE.to_json() | {"items": []}
    with pytest.raises(ValueError, match="at least one"):
        Reference.from_json(data)


def test_status_json_rounds_the_ratios_and_names_the_kernel_environment() -> None:
    status = NumericsStatus("int8_float32", True, 1.058912, 0.68123, "auto", env={"A": "0"})
    assert status.to_json() == {
        "compute_type": "int8_float32",
        "verified": True,
        "nll_ratio": 1.0589,
        "agreement_ratio": 0.6812,
        "chosen_by": "auto",
        "kernel_env": {"A": "0"},
        "warning": None,
    }
