"""From raw request records to the numbers of one table row. Pure functions.

Definitions (the same for every scenario, so rows compare):

- **aggregate tokens/s**: tokens that arrived inside the level's steady-state window,
  divided by the window's length. A request's tokens are spread over its streamed
  messages (``tokens / messages`` each, exact when every message is one token); a
  request observed only as a whole spreads its tokens evenly from its first token (or
  its start) to its end. Only the part inside the window counts, so the tail where
  fewer clients are still busy does not dilute the rate.
- **TTFT**: first token minus request sent, per request; p50 and p95 over requests.
- **per-stream tokens/s**: what one user sees once text flows:
  ``(tokens - 1) / (end - first token)``, per request; the median over requests.
- **CPU seconds per 1000 tokens**: the serving process's CPU time during the level
  over every token the level generated (tail included, as the CPU time is).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from bench.records import LevelRun, RequestRecord


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) with linear interpolation, like numpy's default."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be within 0..100, got {q}")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    below = math.floor(position)
    above = math.ceil(position)
    if below == above:
        return ordered[below]
    if math.isinf(ordered[above]):  # between a value and infinity (a request lost)
        return ordered[above]
    fraction = position - below
    return ordered[below] + (ordered[above] - ordered[below]) * fraction


def tokens_in_window(record: RequestRecord, low: float, high: float) -> float:
    """How many of the record's tokens arrived within [low, high] (see module docs)."""
    if record.tokens <= 0 or high <= low:
        return 0.0
    if record.message_times:
        share = record.tokens / len(record.message_times)
        inside = sum(1 for moment in record.message_times if low <= moment <= high)
        return share * inside
    begin = record.first_token if record.first_token is not None else record.start
    if record.end <= begin:  # all at one instant
        return float(record.tokens) if low <= record.end <= high else 0.0
    overlap = min(high, record.end) - max(low, begin)
    return record.tokens * max(0.0, overlap) / (record.end - begin)


def steady_window(records: Sequence[RequestRecord], started: float) -> tuple[float, float]:
    """From `started` until the first client finished its last request."""
    last_end_per_client: dict[int, float] = {}
    for record in records:
        previous = last_end_per_client.get(record.client, record.end)
        last_end_per_client[record.client] = max(previous, record.end)
    if not last_end_per_client:
        return (started, started)
    return (started, min(last_end_per_client.values()))


@dataclass(frozen=True, slots=True)
class LevelSummary:
    scenario: str
    streams: int
    requests: int  # completed without error
    errors: int
    tokens: int  # every token generated during the level, tail included
    window_s: float
    aggregate_tps: float | None
    ttft_p50_ms: float | None
    ttft_p95_ms: float | None
    stream_tps_p50: float | None
    tokens_per_request: float | None  # mean over completed requests
    cpu_s_per_1k_tokens: float | None  # serving process (in-process: this process)
    client_cpu_s_per_1k_tokens: float | None  # the benchmark client, when apart
    peak_rss_mib: float | None  # serving process's high-water mark
    finish_reasons: dict[str, int]
    first_error: str | None


def summarize(run: LevelRun, *, in_process: bool = False) -> LevelSummary:
    """One table row from one level. `in_process`: the client *is* the server."""
    completed = [record for record in run.records if record.ok]
    failed = [record for record in run.records if not record.ok]
    low, high = run.window
    window_s = max(0.0, high - low)
    tokens = sum(record.tokens for record in completed)
    aggregate = None
    if completed and window_s > 0:
        aggregate = sum(tokens_in_window(r, low, high) for r in completed) / window_s

    ttfts = [
        (record.first_token - record.start) * 1000
        for record in completed
        if record.first_token is not None
    ]
    stream_rates = [
        (record.tokens - 1) / (record.end - record.first_token)
        for record in completed
        if record.first_token is not None and record.tokens >= 2 and record.end > record.first_token
    ]
    serving = run.client if in_process else run.server
    client = None if in_process else run.client
    reasons: dict[str, int] = {}
    for record in completed:
        reason = record.finish_reason or "unknown"
        reasons[reason] = reasons.get(reason, 0) + 1
    return LevelSummary(
        scenario=run.scenario,
        streams=run.streams,
        requests=len(completed),
        errors=len(failed),
        tokens=tokens,
        window_s=window_s,
        aggregate_tps=aggregate,
        ttft_p50_ms=percentile(ttfts, 50) if ttfts else None,
        ttft_p95_ms=percentile(ttfts, 95) if ttfts else None,
        stream_tps_p50=percentile(stream_rates, 50) if stream_rates else None,
        tokens_per_request=tokens / len(completed) if completed else None,
        cpu_s_per_1k_tokens=_per_1k(serving.cpu_seconds, tokens) if serving else None,
        client_cpu_s_per_1k_tokens=_per_1k(client.cpu_seconds, tokens) if client else None,
        peak_rss_mib=_mib(serving.peak_rss_bytes) if serving else None,
        finish_reasons=reasons,
        first_error=failed[0].error if failed else None,
    )


def _per_1k(cpu_seconds: float, tokens: int) -> float | None:
    return cpu_seconds * 1000 / tokens if tokens > 0 else None


def _mib(size: int | None) -> float | None:
    return size / 2**20 if size is not None else None
