"""The side-by-side studies of one engine feature (not closed-loop levels): call turns,
structured output, LoRA adapters. Their results, the report's tables and the plot's
series: plain data and pure functions, no I/O.

Each study compares two variants measured one after the other in the same run, so its
ratios mean the same on every machine; none is an absolute speed.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

from bench.stats import percentile

CALL_TURNS = "call-turns"
STRUCTURED = "structured"
LORA = "lora"
STUDY_SCENARIOS = (CALL_TURNS, STRUCTURED, LORA)
STUDY_LABELS = {
    CALL_TURNS: "calls turn by turn: TTFT by turn, llama_cpp prefix reuse on and off "
    "(and llama.cpp's server with cache_prompt when built)",
    STRUCTURED: "structured output (llama_cpp, transformers): constrained vs free decoding",
    LORA: "LoRA adapters (llama_cpp): 4 adapters in the mix vs the base alone",
}
# Issue 22: the last three turns at most this multiple of the median of turns 1-3.
TURN_GROWTH_GOAL = 1.5
# Issue 25: the mix's tokens/s at least this share of the base's.
LORA_GOAL = 0.8
# The turns a growth ratio compares (1-based in the report): the first and last three.
EDGE_TURNS = 3
TAIL_TURNS = 4  # the p95 measure's last turns: 9-12 of a 12-turn call


@dataclass(frozen=True, slots=True)
class TurnSeries:
    """One variant's calls: the time to first token of every call's n-th turn, seconds."""

    variant: str  # e.g. "llama_cpp, reuse"
    calls: int
    ttft_s: tuple[tuple[float, ...], ...]  # [turn][call]; NaN: no token came
    reused_tokens: int | None = None  # None: the peer does not say
    read_tokens: int | None = None
    held_bytes: int | None = None  # the most the prefix cache held at any turn's end

    @property
    def label(self) -> str:
        return f"{self.variant}, {self.calls} call{'s' if self.calls != 1 else ''}"


@dataclass(frozen=True, slots=True)
class StructuredLevel:
    """Free and constrained decoding on one backend at one concurrency: medians over
    interleaved rounds."""

    backend: str
    streams: int
    free_tps: float
    constrained_tps: float
    free_ttft_s: float
    constrained_ttft_s: float


@dataclass(frozen=True, slots=True)
class LoraRun:
    streams: int
    new_tokens: int
    base_tps: float
    mix_tps: float


@dataclass
class Studies:
    """What the study scenarios measured, as each one ends (a later failure keeps them)."""

    call_turns: list[TurnSeries] = field(default_factory=list)
    structured: list[StructuredLevel] = field(default_factory=list)
    lora: list[LoraRun] = field(default_factory=list)

    def measured(self) -> bool:
        return bool(self.call_turns or self.structured or self.lora)


def _ms(values: Sequence[float], q: float) -> float | None:
    finite = [value for value in values if math.isfinite(value)]
    if len(finite) < len(values) or not finite:
        # A turn without a first token counts as infinitely slow, as in the open loop.
        return math.inf if values else None
    return percentile(finite, q) * 1000


def turn_percentiles(series: TurnSeries, q: float) -> list[float | None]:
    """The q-th percentile TTFT (ms) of each turn, in turn order."""
    return [_ms(turn, q) for turn in series.ttft_s]


def turn_growth(per_turn: Sequence[float | None]) -> float | None:
    """The slowest of the last three turns over the median of the first three (issue 22's
    measure; the first three are their median so one cold start does not decide it).
    None when there are too few turns or a value is missing."""
    if len(per_turn) < 2 * EDGE_TURNS:
        return None
    first, last = per_turn[:EDGE_TURNS], per_turn[-EDGE_TURNS:]
    if any(value is None for value in (*first, *last)):
        return None
    baseline = statistics.median(value for value in first if value is not None)
    if not baseline > 0:
        return None
    return max(value for value in last if value is not None) / baseline


def tail_growth(per_turn: Sequence[float | None]) -> float | None:
    """Issue 22's measure under concurrency, on per-turn p95s: the slowest of the last four
    turns (turns 9-12 of a 12-turn call) over the slowest of the first three. None when
    the turns overlap (fewer than seven) or a value is missing."""
    if len(per_turn) < EDGE_TURNS + TAIL_TURNS:
        return None
    first, last = per_turn[:EDGE_TURNS], per_turn[-TAIL_TURNS:]
    if any(value is None for value in (*first, *last)):
        return None
    baseline = max(value for value in first if value is not None)
    if not baseline > 0:
        return None
    return max(value for value in last if value is not None) / baseline


def _cell(value: float | None, decimals: int = 0) -> str:
    if value is None:
        return "–"
    if math.isinf(value):
        return "∞"
    return f"{value:,.{decimals}f}"


def turn_table(series: Sequence[TurnSeries]) -> tuple[tuple[str, ...], list[list[str]]]:
    """(header, rows): one row per turn, p50 and p95 TTFT (ms) of every series."""
    header = ("turn", *(f"{s.label} p50 / p95 ms" for s in series))
    p50 = [turn_percentiles(s, 50) for s in series]
    p95 = [turn_percentiles(s, 95) for s in series]
    turns = max((len(s.ttft_s) for s in series), default=0)
    rows = []
    for turn in range(turns):
        cells = [
            f"{_cell(a[turn])} / {_cell(b[turn])}" if turn < len(a) else "–"
            for a, b in zip(p50, p95, strict=True)
        ]
        rows.append([str(turn + 1), *cells])
    return header, rows


TURN_SUMMARY_COLUMNS = (
    "variant",
    "calls",
    "p50 last 3 / first 3",
    "p95 last 4 / first 3 (max)",
    "tokens reused / read",
    "most held MiB",
    f"goal ≤ {TURN_GROWTH_GOAL:g}× (p50)",
)


def turn_summary_rows(series: Sequence[TurnSeries]) -> list[list[str]]:
    rows = []
    for s in series:
        growth = turn_growth(turn_percentiles(s, 50))
        tail = tail_growth(turn_percentiles(s, 95))
        reused = (
            "–"
            if s.reused_tokens is None or s.read_tokens is None
            else f"{s.reused_tokens:,} / {s.read_tokens:,}"
        )
        held = "–" if s.held_bytes is None else f"{s.held_bytes / 2**20:,.1f}"
        rows.append(
            [
                s.variant,
                str(s.calls),
                _ratio(growth),
                _ratio(tail),
                reused,
                held,
                _verdict(None if growth is None else growth <= TURN_GROWTH_GOAL),
            ]
        )
    return rows


def turn_plot_series(
    series: Sequence[TurnSeries], q: float = 50
) -> list[tuple[str, list[int], list[float]]]:
    """What the plot draws: (label, turn numbers, TTFT ms) per series, finite points only."""
    lines = []
    for s in series:
        points = [
            (turn + 1, value)
            for turn, value in enumerate(turn_percentiles(s, q))
            if value is not None and math.isfinite(value)
        ]
        if points:
            lines.append((s.label, [t for t, _ in points], [v for _, v in points]))
    return lines


STRUCTURED_COLUMNS = (
    "backend",
    "streams",
    "free tok/s",
    "constrained tok/s",
    "constrained / free tok/s",
    "free TTFT ms",
    "constrained TTFT ms",
    "constrained / free TTFT",
)


def structured_rows(levels: Sequence[StructuredLevel]) -> list[list[str]]:
    return [
        [
            level.backend,
            str(level.streams),
            _cell(level.free_tps, 1),
            _cell(level.constrained_tps, 1),
            _ratio(_quotient(level.constrained_tps, level.free_tps)),
            _cell(level.free_ttft_s * 1000, 1),
            _cell(level.constrained_ttft_s * 1000, 1),
            _ratio(_quotient(level.constrained_ttft_s, level.free_ttft_s)),
        ]
        for level in sorted(levels, key=lambda level: (level.backend, level.streams))
    ]


LORA_COLUMNS = (
    "streams",
    "new tokens",
    "base tok/s",
    "mix tok/s",
    "mix / base",
    f"goal ≥ {LORA_GOAL:g}×",
)


def lora_rows(runs: Sequence[LoraRun]) -> list[list[str]]:
    rows = []
    for run in runs:
        ratio = _quotient(run.mix_tps, run.base_tps)
        rows.append(
            [
                str(run.streams),
                str(run.new_tokens),
                _cell(run.base_tps, 1),
                _cell(run.mix_tps, 1),
                _ratio(ratio),
                _verdict(None if ratio is None else ratio >= LORA_GOAL),
            ]
        )
    return rows


def _quotient(value: float, baseline: float) -> float | None:
    if not (math.isfinite(value) and math.isfinite(baseline)) or baseline <= 0:
        return None
    return value / baseline


def _ratio(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}×"


def _verdict(passed: bool | None) -> str:
    return "n/a" if passed is None else ("met" if passed else "MISSED")


def study_tables(studies: Studies) -> list[tuple[str, tuple[str, ...], list[list[str]]]]:
    """(title, header, rows) of every study that measured something, in report order."""
    tables: list[tuple[str, tuple[str, ...], list[list[str]]]] = []
    if studies.call_turns:
        header, rows = turn_table(studies.call_turns)
        tables.append(("Calls: TTFT by turn (ms, p50 / p95 over calls)", header, rows))
        tables.append(
            (
                "Calls: growth over the call, reuse and memory",
                TURN_SUMMARY_COLUMNS,
                turn_summary_rows(studies.call_turns),
            )
        )
    if studies.structured:
        tables.append(
            (
                "Structured output: constrained vs free, per backend",
                STRUCTURED_COLUMNS,
                structured_rows(studies.structured),
            )
        )
    if studies.lora:
        tables.append(
            (
                "LoRA (llama_cpp): 4 adapters in the mix vs the base",
                LORA_COLUMNS,
                lora_rows(studies.lora),
            )
        )
    return tables
