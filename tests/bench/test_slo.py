"""bench/slo.py: per-request TTFT/TPOT, SLO verdicts, goodput, capacity, the sweep."""

from __future__ import annotations

import math

import pytest

from bench.records import GRPC, LLAMA_CPP, RateRun, RequestRecord
from bench.slo import (
    Capacity,
    RateSummary,
    Slo,
    SweepPlan,
    capacity_at_slo,
    capacity_ratio,
    lattice_rate_at_or_below,
    level_window_s,
    meets,
    next_rate,
    starting_rate,
    summarize_rate,
    tpot_s,
    ttft_s,
)

SLO = Slo(ttft_s=1.0, tpot_s=0.1)


def answered(start: float, ttft: float, tokens: int, tpot: float) -> RequestRecord:
    first = start + ttft
    times = tuple(first + i * tpot for i in range(tokens))
    return RequestRecord.streamed(0, start, times[-1], times, tokens=tokens)


def failed(start: float, error: str = "RESOURCE_EXHAUSTED: at capacity") -> RequestRecord:
    return RequestRecord(client=0, start=start, end=start, tokens=0, error=error)


def test_ttft_and_tpot_of_a_request() -> None:
    record = answered(start=10.0, ttft=0.4, tokens=11, tpot=0.05)
    assert ttft_s(record) == pytest.approx(0.4)
    assert tpot_s(record) == pytest.approx(0.05)
    assert tpot_s(answered(0.0, 0.2, tokens=1, tpot=0.0)) is None  # no gap to measure
    assert ttft_s(failed(0.0)) == math.inf and tpot_s(failed(0.0)) == math.inf


@pytest.mark.parametrize(
    ("record", "met"),
    [
        (answered(0.0, 0.9, 50, 0.09), True),
        (answered(0.0, 1.1, 50, 0.05), False),  # first token too late
        (answered(0.0, 0.2, 50, 0.12), False),  # words too slow once they flow
        (answered(0.0, 0.2, 1, 0.0), True),  # one token: TTFT alone decides
        (failed(0.0), False),
    ],
)
def test_a_request_meets_the_slo_on_both_limits(record: RequestRecord, met: bool) -> None:
    assert meets(record, SLO) is met


def test_a_level_summary_counts_failures_as_infinitely_late() -> None:
    # 20 requests over a 10 s window: 17 fine, 1 slow to start, 2 refused.
    records = [answered(i * 0.5, 0.3, 33, 0.05) for i in range(17)]
    records += [answered(8.5, 2.0, 33, 0.05), failed(9.0), failed(9.5)]
    summary = summarize_rate(RateRun(GRPC, 2.0, tuple(records), (0.0, 10.0)), SLO)
    assert (summary.sent, summary.completed, summary.failed) == (20, 18, 2)
    assert summary.goodput_rps == pytest.approx(1.7)  # 17 met / 10 s
    assert summary.met_share == pytest.approx(0.85)
    assert summary.ttft_p50_ms == pytest.approx(300.0)
    assert summary.ttft_p99_ms == math.inf  # the refused are in the tail
    assert summary.ttft_p95_ms == math.inf  # 95th of 20 falls between 2000 ms and ∞
    assert not summary.meets_slo
    assert summary.first_error == "RESOURCE_EXHAUSTED: at capacity"
    assert summary.tpot_p50_ms == pytest.approx(50.0)


def test_a_level_meets_the_slo_when_both_p95_do() -> None:
    records = [answered(i * 0.5, 0.3, 33, 0.05) for i in range(20)]
    summary = summarize_rate(RateRun(GRPC, 2.0, tuple(records), (0.0, 10.0)), SLO)
    assert summary.meets_slo
    assert summary.throughput_tps > 0
    empty = summarize_rate(RateRun(GRPC, 2.0, (), (0.0, 10.0)), SLO)
    assert not empty.meets_slo  # nothing measured proves nothing


def level(target: str, rate: float, met: bool) -> RateSummary:
    p95 = 500.0 if met else 3000.0
    return RateSummary(
        target, rate, 10.0, 10, 10, 0, p95, p95, p95, 50.0, 60.0, 0.0, 0.0, 1.0, met, None
    )


def test_capacity_is_the_highest_rate_below_the_first_missed() -> None:
    levels = [level(GRPC, 0.5, True), level(GRPC, 1, True), level(GRPC, 2, False)]
    # A rate met above one missed (noise) does not raise the capacity.
    levels += [level(GRPC, 1.41, True), level(GRPC, 2.83, True), level(LLAMA_CPP, 1, False)]
    ours = capacity_at_slo(GRPC, levels)
    assert ours == Capacity(GRPC, 1.41, 0.5, 2.83, bounded=True)
    theirs = capacity_at_slo(LLAMA_CPP, levels)
    assert theirs is not None and theirs.rps == 0.0
    assert theirs.describe() == "< 1 req/s (missed the SLO at every rate measured)"
    assert capacity_at_slo("other", levels) is None


def test_capacity_ratio_names_bounds_and_infinity() -> None:
    def cap(rps: float, bounded: bool = True) -> Capacity:
        return Capacity(GRPC, rps, 0.5, 4.0, bounded)

    assert capacity_ratio(cap(3.0), cap(2.0)).text == "1.50× (3 req/s vs 2 req/s)"
    assert capacity_ratio(cap(4.0, bounded=False), cap(2.0)).text.startswith("≥ 2.00×")
    assert capacity_ratio(cap(1.0), cap(0.0)).value == math.inf
    assert capacity_ratio(cap(0.0), cap(0.0)).value is None
    assert capacity_ratio(None, cap(1.0)).text == "n/a"


def test_the_lattice_and_the_first_rate_follow_the_measured_request() -> None:
    assert lattice_rate_at_or_below(1.0) == 1.0
    assert lattice_rate_at_or_below(1.5) == pytest.approx(math.sqrt(2))
    assert lattice_rate_at_or_below(0.3) == 0.25
    assert starting_rate(single_request_s=2.0) == 0.5  # 1 / 2 s
    assert starting_rate(single_request_s=0.3) == 2.0 * math.sqrt(2)  # 3.33 → 2.83


def test_the_sweep_climbs_until_missed_then_bisects() -> None:
    plan = SweepPlan(start_rps=1.0, max_levels=10, refinements=2, min_rps=0.125)
    outcomes: list[tuple[float, bool]] = []
    capacity = 3.0  # a server that meets the SLO up to 3 req/s
    while (rate := next_rate(plan, outcomes)) is not None:
        outcomes.append((rate, rate <= capacity))
    rates = [rate for rate, _ in outcomes]
    assert rates[:3] == [1.0, 2.0, 4.0]
    assert rates[3] == pytest.approx(2 * math.sqrt(2))  # met
    assert rates[4] == pytest.approx(math.sqrt(2 * math.sqrt(2) * 4))  # 3.36: missed
    assert len(rates) == 5


def test_the_sweep_descends_when_even_the_first_rate_misses() -> None:
    plan = SweepPlan(start_rps=1.0, max_levels=10, refinements=1, min_rps=0.25)
    outcomes: list[tuple[float, bool]] = []
    while (rate := next_rate(plan, outcomes)) is not None:
        outcomes.append((rate, False))
    assert [rate for rate, _ in outcomes] == [1.0, 0.5, 0.25]


def test_the_sweep_stops_at_its_level_budget() -> None:
    plan = SweepPlan(start_rps=1.0, max_levels=3, refinements=2, min_rps=0.1)
    outcomes = [(1.0, True), (2.0, True), (4.0, True)]
    assert next_rate(plan, outcomes) is None


def test_low_rates_get_longer_windows_within_bounds() -> None:
    assert level_window_s(4.0, min_s=15, min_requests=24, max_s=45) == 15
    assert level_window_s(1.0, min_s=15, min_requests=24, max_s=45) == 24
    assert level_window_s(0.1, min_s=15, min_requests=24, max_s=45) == 45


def test_the_drain_covers_the_slowest_request_that_can_still_meet_the_slo() -> None:
    assert SLO.longest_compliant_s(128) == pytest.approx(1.0 + 127 * 0.1)
    with pytest.raises(ValueError, match="positive"):
        Slo(ttft_s=0.0)
