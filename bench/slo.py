"""The open-loop numbers: per-rate latency percentiles, goodput, capacity at SLO. Pure.

Definitions (docs/BENCHMARKS.md repeats them):

- A request's **TTFT**: first token received minus request sent. Its **TPOT** (time per
  output token): ``(end - first token) / (tokens - 1)``, defined from two tokens on
  (vLLM's benchmark defines it the same way).
- A request **meets the SLO** when it completed without error, its TTFT is at most
  ``Slo.ttft_s`` and its TPOT (when defined) at most ``Slo.tpot_s``.
- Percentiles are over every request the level sent. A request that failed, was
  refused, or was cancelled after the level's drain time counts as an infinite TTFT
  and TPOT: a server cannot improve its percentiles by refusing work.
- **Goodput**: requests that met the SLO per second of the level's arrival window.
- A level **meets the SLO** when its p95 TTFT and its p95 TPOT both do.
- **Capacity at SLO**: the highest offered rate R of the sweep such that every level
  offered at most R met the SLO. Zero when the lowest rate measured missed it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from bench.records import RateRun, RequestRecord
from bench.stats import percentile, tokens_in_window

DEFAULT_TTFT_S = 1.0
DEFAULT_TPOT_S = 0.100


@dataclass(frozen=True, slots=True)
class Slo:
    ttft_s: float = DEFAULT_TTFT_S
    tpot_s: float = DEFAULT_TPOT_S

    def __post_init__(self) -> None:
        if self.ttft_s <= 0 or self.tpot_s <= 0:
            raise ValueError(f"SLO limits must be positive, got {self.ttft_s}, {self.tpot_s}")

    def describe(self) -> str:
        return f"TTFT ≤ {self.ttft_s * 1000:,.0f} ms and TPOT ≤ {self.tpot_s * 1000:,.0f} ms"

    def longest_compliant_s(self, max_new_tokens: int) -> float:
        """The longest a request of `max_new_tokens` can take and still meet the SLO."""
        return self.ttft_s + max(0, max_new_tokens - 1) * self.tpot_s


def ttft_s(record: RequestRecord) -> float:
    if not record.ok or record.first_token is None:
        return math.inf
    return record.first_token - record.start


def tpot_s(record: RequestRecord) -> float | None:
    """None when the request generated fewer than two tokens (no gap to measure)."""
    if not record.ok or record.first_token is None:
        return math.inf
    if record.tokens < 2:
        return None
    return max(0.0, record.end - record.first_token) / (record.tokens - 1)


def meets(record: RequestRecord, slo: Slo) -> bool:
    per_token = tpot_s(record)
    return ttft_s(record) <= slo.ttft_s and (per_token is None or per_token <= slo.tpot_s)


@dataclass(frozen=True, slots=True)
class RateSummary:
    target: str
    offered_rps: float
    window_s: float  # the arrival window
    sent: int
    completed: int
    failed: int  # errors, refusals, client-side drops and cancellations together
    ttft_p50_ms: float  # inf when more than half the requests failed
    ttft_p95_ms: float
    ttft_p99_ms: float
    tpot_p50_ms: float | None  # None when no request had two tokens
    tpot_p95_ms: float | None
    throughput_tps: float  # tokens that arrived within the arrival window, per second
    goodput_rps: float
    met_share: float  # the share of sent requests that met the SLO
    meets_slo: bool
    first_error: str | None


def summarize_rate(run: RateRun, slo: Slo) -> RateSummary:
    records = run.records
    low, high = run.window
    window_s = max(0.0, high - low)
    ttfts = [ttft_s(record) * 1000 for record in records]
    tpots = [value * 1000 for value in map(tpot_s, records) if value is not None]
    met = sum(1 for record in records if meets(record, slo))
    failed = [record for record in records if not record.ok]
    tokens = sum(tokens_in_window(record, low, high) for record in records if record.ok)
    ttft_p95 = percentile(ttfts, 95) if ttfts else math.inf
    tpot_p95 = percentile(tpots, 95) if tpots else None
    return RateSummary(
        target=run.target,
        offered_rps=run.rate,
        window_s=window_s,
        sent=len(records),
        completed=len(records) - len(failed),
        failed=len(failed),
        ttft_p50_ms=percentile(ttfts, 50) if ttfts else math.inf,
        ttft_p95_ms=ttft_p95,
        ttft_p99_ms=percentile(ttfts, 99) if ttfts else math.inf,
        tpot_p50_ms=percentile(tpots, 50) if tpots else None,
        tpot_p95_ms=tpot_p95,
        throughput_tps=tokens / window_s if window_s > 0 else 0.0,
        goodput_rps=met / window_s if window_s > 0 else 0.0,
        met_share=met / len(records) if records else 0.0,
        meets_slo=bool(records)
        and ttft_p95 <= slo.ttft_s * 1000
        and (tpot_p95 is None or tpot_p95 <= slo.tpot_s * 1000),
        first_error=failed[0].error if failed else None,
    )


@dataclass(frozen=True, slots=True)
class Capacity:
    target: str
    rps: float  # 0.0 when even the lowest rate measured missed the SLO
    lowest_rps: float  # the sweep's range, for reading `rps`
    highest_rps: float
    bounded: bool  # False when no rate missed the SLO: the capacity is at least `rps`

    def describe(self) -> str:
        if self.rps == 0:
            return f"< {self.lowest_rps:.3g} req/s (missed the SLO at every rate measured)"
        return f"{'≥ ' if not self.bounded else ''}{self.rps:.3g} req/s"


def capacity_at_slo(target: str, summaries: Iterable[RateSummary]) -> Capacity | None:
    """See the module docstring; None when the target has no level."""
    levels = sorted(
        (s for s in summaries if s.target == target), key=lambda summary: summary.offered_rps
    )
    if not levels:
        return None
    capacity = 0.0
    bounded = False
    for level in levels:
        if not level.meets_slo:
            bounded = True
            break
        capacity = level.offered_rps
    return Capacity(target, capacity, levels[0].offered_rps, levels[-1].offered_rps, bounded)


@dataclass(frozen=True, slots=True)
class CapacityRatio:
    text: str
    value: float | None  # None when it cannot be computed (a capacity missing)


def capacity_ratio(ours: Capacity | None, theirs: Capacity | None) -> CapacityRatio:
    """Ours over theirs. When theirs is zero the ratio is unbounded (shown as ∞) if ours
    is not; a lower bound (a sweep that never missed) is marked with ≥ or ≤."""
    if ours is None or theirs is None:
        return CapacityRatio("n/a", None)
    if theirs.rps == 0:
        if ours.rps == 0:
            return CapacityRatio("n/a (both missed the SLO at every rate measured)", None)
        return CapacityRatio(f"∞ ({ours.describe()} vs {theirs.describe()})", math.inf)
    value = ours.rps / theirs.rps
    qualifier = ""
    if not ours.bounded and theirs.bounded:
        qualifier = "≥ "
    elif ours.bounded and not theirs.bounded:
        qualifier = "≤ "
    elif not ours.bounded and not theirs.bounded:
        qualifier = "~ "
    return CapacityRatio(
        f"{qualifier}{value:.2f}× ({ours.describe()} vs {theirs.describe()})", value
    )


# ------------------------------------------------------------------------- the sweep

RATE_STEP = 2.0  # the sweep climbs and descends by doublings, then bisects


def lattice_rate_at_or_below(rate: float) -> float:
    """The largest power of √2 (req/s) not above `rate`: every machine's sweep lies on
    the same lattice, so runs and servers compare level by level."""
    if rate <= 0:
        raise ValueError(f"rate must be positive, got {rate}")
    exponent = math.floor(2 * math.log2(rate) + 1e-9)
    return float(2 ** (exponent / 2))


@dataclass(frozen=True, slots=True)
class SweepPlan:
    start_rps: float  # the first rate; the sweep climbs (or descends) from there
    max_levels: int  # at most this many levels per target
    refinements: int  # bisection steps between the last rate met and the first missed
    min_rps: float  # no level below this: the capacity is then reported as "< min"


def starting_rate(single_request_s: float, load: float = 1.0) -> float:
    """Where a server that served one request at a time would be `load` busy: the
    lattice rate at or below `load / single_request_s`. A server that batches takes
    more; the sweep climbs from there."""
    if single_request_s <= 0:
        raise ValueError(f"a request cannot take {single_request_s} s")
    return lattice_rate_at_or_below(load / single_request_s)


def level_window_s(rate: float, min_s: float, min_requests: int, max_s: float) -> float:
    """The arrival window of a level: `min_s`, longer at low rates so that about
    `min_requests` arrive (percentiles of three requests say little), at most `max_s`."""
    if rate <= 0:
        raise ValueError(f"rate must be positive, got {rate}")
    return min(max(min_s, min_requests / rate), max(min_s, max_s))


def next_rate(plan: SweepPlan, outcomes: Sequence[tuple[float, bool]]) -> float | None:
    """The next rate to measure given (rate, met the SLO) so far, or None when done.

    Climbs by doublings from the start until a rate misses; halves while every rate
    missed (not below `min_rps`); then bisects (geometrically: the first bisection of a
    doubling is the √2 point of the lattice) between the highest rate met below the
    lowest one missed and that one, `refinements` times."""
    if not outcomes:
        return plan.start_rps
    if len(outcomes) >= plan.max_levels:
        return None
    missed = [rate for rate, met in outcomes if not met]
    if not missed:
        return max(rate for rate, _ in outcomes) * RATE_STEP
    lowest_missed = min(missed)
    met_below = [rate for rate, met in outcomes if met and rate < lowest_missed]
    if not met_below:
        lower = lowest_missed / RATE_STEP
        return lower if lower >= plan.min_rps * (1 - 1e-9) else None
    if _bisections(outcomes) >= plan.refinements:
        return None
    return math.sqrt(max(met_below) * lowest_missed)


def _bisections(outcomes: Sequence[tuple[float, bool]]) -> int:
    """Levels measured once both a rate met and a rate missed were known."""
    seen_met = seen_missed = False
    for index, (_, met) in enumerate(outcomes):
        seen_met, seen_missed = seen_met or met, seen_missed or not met
        if seen_met and seen_missed:
            return len(outcomes) - index - 1
    return 0
