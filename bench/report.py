"""Ratios to baselines, the issue's targets, and the table: pure functions over summaries.

Every row's ratios name their baseline, so a reader never has to guess what "2.1×"
is relative to. Rates are compared, never totals: tokens/s does not depend on how
many tokens each request happened to generate.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from bench.records import (
    CT2_BATCH,
    CT2_STREAM,
    GRPC,
    GRPC_LLAMA_CPP,
    GRPC_PAIRED,
    LLAMA_CPP,
    OPENAI_HTTP,
    SCENARIO_ORDER,
    TRANSFORMERS,
    Skipped,
)
from bench.slo import Capacity, RateSummary, capacity_at_slo, capacity_ratio
from bench.stats import LevelSummary

# Time to first token under load, as a multiple of the single-stream figure (p95 over
# p95, both through gRPC in the same run): a ratio that means the same on every machine.
TTFT_TARGET_STREAMS = 16
TTFT_TARGET_FACTOR = 3.0
CEILING_FACTOR = 0.95
PEER_FACTORS = {1: 1.0, 16: 2.0, 32: 2.0}  # gRPC tokens/s over llama.cpp's, per streams
CAPACITY_FACTOR = 1.5  # capacity at SLO over llama.cpp's
# The llama_cpp backend against llama.cpp's own server on the same GGUF (issue 21):
# tokens/s ratios per streams, and its capacity at SLO over the server's and ct2's.
LLAMA_CPP_PEER_FACTORS = {1: 0.95, 16: 1.0, 32: 1.0}
LLAMA_CPP_CAPACITY_FACTORS = {LLAMA_CPP: 1.5, GRPC: 1.0}


@dataclass(frozen=True, slots=True)
class Ratio:
    text: str  # e.g. "0.97× in-process 1 stream"
    value: float


@dataclass(frozen=True, slots=True)
class TargetResult:
    name: str
    required: str
    measured: str  # "n/a" when a scenario it needs did not run
    passed: bool | None  # None: could not be evaluated


class Summaries:
    """Summaries indexed by (scenario, streams)."""

    def __init__(self, summaries: Iterable[LevelSummary]) -> None:
        self._by_key = {(s.scenario, s.streams): s for s in summaries}

    def get(self, scenario: str, streams: int) -> LevelSummary | None:
        return self._by_key.get((scenario, streams))

    def rate(self, scenario: str, streams: int) -> float | None:
        found = self.get(scenario, streams)
        return found.aggregate_tps if found is not None else None

    def ordered(self) -> list[LevelSummary]:
        rank = {name: index for index, name in enumerate(SCENARIO_ORDER)}
        return sorted(self._by_key.values(), key=lambda s: (rank.get(s.scenario, 99), s.streams))


def _ratio(value: float | None, baseline: float | None, baseline_name: str) -> Ratio | None:
    if value is None or baseline is None or baseline <= 0:
        return None
    quotient = value / baseline
    return Ratio(f"{quotient:.2f}× {baseline_name}", quotient)


def ratios_for(summary: LevelSummary, table: Summaries) -> list[Ratio]:
    """Each row's throughput against the baselines that matter for it."""
    rate, streams = summary.aggregate_tps, summary.streams
    found: list[Ratio | None] = []
    if summary.scenario == CT2_STREAM:
        found.append(_ratio(rate, table.rate(TRANSFORMERS, 1), "transformers"))
    elif summary.scenario == CT2_BATCH:
        found.append(_ratio(rate, table.rate(CT2_STREAM, 1), "in-process 1 stream"))
    elif summary.scenario == GRPC:
        if streams == 1:
            found.append(_ratio(rate, table.rate(CT2_STREAM, 1), "in-process 1 stream"))
            found.append(_ttft_difference(summary, table.get(CT2_STREAM, 1)))
        else:
            found.append(_ratio(rate, table.rate(GRPC, 1), "gRPC 1 stream"))
            found.append(_ratio(rate, table.rate(CT2_BATCH, streams), f"ceiling @{streams}"))
        found.append(_ratio(rate, table.rate(LLAMA_CPP, streams), f"llama.cpp @{streams}"))
        if streams > 1:
            single = table.get(GRPC, 1)
            found.append(
                _ratio(
                    summary.ttft_p95_ms,
                    None if single is None else single.ttft_p95_ms,
                    "1 stream's p95 TTFT",
                )
            )
    elif summary.scenario == OPENAI_HTTP:
        paired = table.get(GRPC_PAIRED, streams)
        found.append(
            _ratio(
                summary.stream_tps_p50,
                None if paired is None else paired.stream_tps_p50,
                "gRPC per stream",
            )
        )
        found.append(_ttft_difference(summary, paired, "gRPC"))
    elif summary.scenario == LLAMA_CPP:
        if streams == 1:
            found.append(_ratio(rate, table.rate(CT2_STREAM, 1), "in-process 1 stream"))
        else:
            found.append(_ratio(rate, table.rate(LLAMA_CPP, 1), "llama.cpp 1 stream"))
    return [ratio for ratio in found if ratio is not None]


def _ttft_difference(
    summary: LevelSummary, baseline: LevelSummary | None, baseline_name: str = "in-process"
) -> Ratio | None:
    if baseline is None or summary.ttft_p50_ms is None or baseline.ttft_p50_ms is None:
        return None
    difference = summary.ttft_p50_ms - baseline.ttft_p50_ms
    return Ratio(f"TTFT p50 {difference:+.1f} ms vs {baseline_name}", difference)


def capacity_pair(
    summaries: Sequence[RateSummary], ours: str = GRPC, theirs: str = LLAMA_CPP
) -> tuple[Capacity | None, Capacity | None]:
    """Capacity at SLO of llm-local (its default variant) and of llama.cpp's server."""
    return capacity_at_slo(ours, summaries), capacity_at_slo(theirs, summaries)


def evaluate_targets(
    table: Summaries,
    capacities: tuple[Capacity | None, Capacity | None] = (None, None),
    rate_summaries: Sequence[RateSummary] = (),
) -> list[TargetResult]:
    """The targets, each with what was measured and whether it holds. Every one is a
    ratio (or a difference) measured side by side in one run, so its verdict means the
    same on every machine; none is an absolute speed."""
    grpc_1 = table.get(GRPC, 1)
    in_process = table.get(CT2_STREAM, 1)
    results = [
        _at_least(
            "one stream through gRPC: tokens/s vs in-process",
            table.rate(GRPC, 1),
            table.rate(CT2_STREAM, 1),
            0.95,
        ),
        _ttft_within("one stream through gRPC: TTFT p50 vs in-process", grpc_1, in_process, 5.0),
        _at_least(
            "one stream through HTTP/SSE (/v1/chat/completions): tokens/s vs gRPC",
            _stream_rate(table.get(OPENAI_HTTP, 1)),
            _stream_rate(table.get(GRPC_PAIRED, 1)),
            0.95,
        ),
        _ttft_within(
            "one stream through HTTP/SSE: TTFT p50 vs gRPC",
            table.get(OPENAI_HTTP, 1),
            table.get(GRPC_PAIRED, 1),
            5.0,
        ),
    ]
    results += [
        _at_least(
            f"{streams} streams: gRPC vs the raw generate_batch ceiling",
            table.rate(GRPC, streams),
            table.rate(CT2_BATCH, streams),
            CEILING_FACTOR,
        )
        for streams in (16, 32)
    ]
    results += _peer_targets(table, GRPC, "{streams}: gRPC vs llama.cpp server", PEER_FACTORS)
    results.append(_ttft_growth(table))
    results.append(_capacity_target(*capacities))
    return results + llama_cpp_targets(table, rate_summaries)


def llama_cpp_targets(
    table: Summaries, rate_summaries: Sequence[RateSummary] = ()
) -> list[TargetResult]:
    """The llama_cpp backend's goals: beside llama.cpp's server on the same GGUF, its own
    TTFT growth, and its capacity at SLO against the server's and the ct2 backend's."""
    results = _peer_targets(
        table,
        GRPC_LLAMA_CPP,
        "llama_cpp backend, {streams}: vs llama.cpp server",
        LLAMA_CPP_PEER_FACTORS,
    )
    results.append(_ttft_growth(table, GRPC_LLAMA_CPP))
    ours = capacity_at_slo(GRPC_LLAMA_CPP, rate_summaries)
    for baseline, factor in LLAMA_CPP_CAPACITY_FACTORS.items():
        theirs = capacity_at_slo(baseline, rate_summaries)
        name = f"llama_cpp backend: capacity at SLO vs {SCENARIO_LABEL_SHORT[baseline]}"
        results.append(_capacity_target(ours, theirs, name=name, factor=factor))
    return results


def _peer_targets(
    table: Summaries, scenario: str, name: str, factors: dict[int, float]
) -> list[TargetResult]:
    """`scenario`'s tokens/s over llama.cpp's server per streams, each at least its factor;
    `name` holds "{streams}" ("1 stream", "16 streams")."""
    return [
        _at_least(
            name.format(streams=f"{streams} stream{'s' if streams > 1 else ''}"),
            table.rate(scenario, streams),
            table.rate(LLAMA_CPP, streams),
            factor,
        )
        for streams, factor in factors.items()
    ]


SCENARIO_LABEL_SHORT = {LLAMA_CPP: "llama.cpp server", GRPC: "the ct2 backend"}


def _ttft_growth(table: Summaries, scenario: str = GRPC) -> TargetResult:
    who = "gRPC" if scenario == GRPC else f"{scenario}"
    name = f"TTFT p95 at {TTFT_TARGET_STREAMS} {who} streams vs 1 stream (closed loop)"
    required = f"≤ {TTFT_TARGET_FACTOR:g}×"
    loaded, single = table.get(scenario, TTFT_TARGET_STREAMS), table.get(scenario, 1)
    if loaded is None or single is None:
        return TargetResult(name, required, "n/a", None)
    if loaded.ttft_p95_ms is None or not single.ttft_p95_ms:
        return TargetResult(name, required, "n/a", None)
    quotient = loaded.ttft_p95_ms / single.ttft_p95_ms
    text = f"{quotient:.2f}× ({loaded.ttft_p95_ms:,.0f} vs {single.ttft_p95_ms:,.0f} ms)"
    return TargetResult(name, required, text, quotient <= TTFT_TARGET_FACTOR)


def _capacity_target(
    ours: Capacity | None,
    theirs: Capacity | None,
    *,
    name: str = "capacity at SLO (open loop, gateway-shaped): llm-local vs llama.cpp server",
    factor: float = CAPACITY_FACTOR,
) -> TargetResult:
    required = f"≥ {factor:g}×"
    ratio = capacity_ratio(ours, theirs)
    if ratio.value is None or ours is None or theirs is None:
        return TargetResult(name, required, ratio.text, None)
    passed: bool | None = ratio.value >= factor
    # A sweep that never missed gives a lower bound only: it decides one way alone.
    if not ours.bounded and not passed:
        passed = None
    if not theirs.bounded and theirs.rps > 0 and passed:
        passed = None
    return TargetResult(name, required, ratio.text, passed)


def _stream_rate(summary: LevelSummary | None) -> float | None:
    return None if summary is None else summary.stream_tps_p50


def _at_least(
    name: str, value: float | None, baseline: float | None, factor: float
) -> TargetResult:
    required = f"≥ {factor:g}×"
    if value is None or baseline is None or baseline <= 0:
        return TargetResult(name, required, "n/a", None)
    quotient = value / baseline
    # Three decimals: "0.95×" must not be shown for a 0.947 that fails "≥ 0.95×".
    return TargetResult(
        name,
        required,
        f"{quotient:.3f}× ({value:.1f} vs {baseline:.1f} tokens/s)",
        quotient >= factor,
    )


def _ttft_within(
    name: str, measured: LevelSummary | None, baseline: LevelSummary | None, limit_ms: float
) -> TargetResult:
    required = f"≤ +{limit_ms:g} ms"
    if measured is None or baseline is None:
        return TargetResult(name, required, "n/a", None)
    if measured.ttft_p50_ms is None or baseline.ttft_p50_ms is None:
        return TargetResult(name, required, "n/a", None)
    difference = measured.ttft_p50_ms - baseline.ttft_p50_ms
    text = f"{difference:+.1f} ms ({measured.ttft_p50_ms:.1f} vs {baseline.ttft_p50_ms:.1f} ms)"
    return TargetResult(name, required, text, difference <= limit_ms)


# ---------------------------------------------------------------------------- rendering

COLUMNS = (
    "scenario",
    "streams",
    "tokens/s",
    "per-stream tok/s",
    "TTFT p50 ms",
    "TTFT p95 ms",
    "tok/req",
    "requests",
    "CPU s/1k tok",
    "peak RSS MiB",
    "ratios",
)


def table_rows(table: Summaries, skipped: Sequence[Skipped] = ()) -> list[list[str]]:
    """One row of cells per level, then one per skipped scenario."""
    rows = []
    for summary in table.ordered():
        ratios = "; ".join(ratio.text for ratio in ratios_for(summary, table))
        requests = str(summary.requests)
        if summary.errors:
            requests += f" ({summary.errors} failed)"
        rows.append(
            [
                summary.scenario,
                str(summary.streams),
                _number(summary.aggregate_tps, 0),
                _number(summary.stream_tps_p50, 1),
                _number(summary.ttft_p50_ms, 1),
                _number(summary.ttft_p95_ms, 1),
                _number(summary.tokens_per_request, 0),
                requests,
                _number(summary.cpu_s_per_1k_tokens, 2),
                _number(summary.peak_rss_mib, 0),
                ratios,
            ]
        )
    for skip in skipped:
        rows.append([skip.scenario, "–", *["–"] * (len(COLUMNS) - 3), f"skipped: {skip.reason}"])
    return rows


def _number(value: float | None, decimals: int) -> str:
    return "–" if value is None else f"{value:,.{decimals}f}"


def render_text_table(rows: Sequence[Sequence[str]], header: Sequence[str] = COLUMNS) -> str:
    """A fixed-width table for the terminal; the last column is left unpadded."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header) - 1)]

    def line(cells: Sequence[str]) -> str:
        padded = [
            cell.ljust(width) if index == 0 else cell.rjust(width)
            for index, (cell, width) in enumerate(zip(cells, widths, strict=False))
        ]
        return "  ".join([*padded, cells[-1]]).rstrip()

    rule = "  ".join("-" * width for width in widths) + "  " + "-" * len(header[-1])
    return "\n".join([line(header), rule, *(line(row) for row in rows)])


def render_markdown_table(rows: Sequence[Sequence[str]], header: Sequence[str] = COLUMNS) -> str:
    def escape(cell: str) -> str:
        return cell.replace("|", "\\|")

    alignment = ["---" if index in (0, len(header) - 1) else "---:" for index in range(len(header))]
    lines = [
        "| " + " | ".join(header) + " |",
        "| " + " | ".join(alignment) + " |",
        *("| " + " | ".join(escape(cell) for cell in row) + " |" for row in rows),
    ]
    return "\n".join(lines)


def target_rows(targets: Sequence[TargetResult]) -> list[list[str]]:
    return [[t.name, t.required, t.measured, _verdict(t.passed)] for t in targets]


TARGET_COLUMNS = ("target", "required", "measured", "result")

RATE_COLUMNS = (
    "target",
    "offered req/s",
    "sent",
    "failed",
    "TTFT p50 ms",
    "TTFT p95 ms",
    "TTFT p99 ms",
    "TPOT p50 ms",
    "TPOT p95 ms",
    "tokens/s",
    "goodput req/s",
    "met SLO",
    "SLO (p95)",
)


def rate_rows(summaries: Sequence[RateSummary]) -> list[list[str]]:
    """One row per open-loop level: by target (in report order), then by rate."""
    rank = {name: index for index, name in enumerate(SCENARIO_ORDER)}
    ordered = sorted(summaries, key=lambda s: (rank.get(s.target, 99), s.offered_rps))
    return [
        [
            summary.target,
            f"{summary.offered_rps:.3g}",
            str(summary.sent),
            str(summary.failed),
            _latency(summary.ttft_p50_ms),
            _latency(summary.ttft_p95_ms),
            _latency(summary.ttft_p99_ms),
            _latency(summary.tpot_p50_ms),
            _latency(summary.tpot_p95_ms),
            _number(summary.throughput_tps, 0),
            _number(summary.goodput_rps, 2),
            f"{summary.met_share:.0%}",
            "met" if summary.meets_slo else "missed",
        ]
        for summary in ordered
    ]


def _latency(value: float | None) -> str:
    """Milliseconds; ∞ when the percentile falls on requests that never answered."""
    if value is not None and math.isinf(value):
        return "∞"
    return _number(value, 0)


def _verdict(passed: bool | None) -> str:
    if passed is None:
        return "not measured"
    return "PASS" if passed else "FAIL"
