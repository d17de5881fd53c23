"""bench/loops.py: the closed loop's shape (who sends what, when it stops); no timings."""

from __future__ import annotations

import asyncio
import time

from bench.loops import MAX_CONSECUTIVE_ERRORS, run_closed_loop, run_sequential
from bench.records import RequestRecord


def _record(client: int, error: str | None = None) -> RequestRecord:
    now = time.perf_counter()
    return RequestRecord(client=client, start=now, end=now, tokens=1, error=error)


def test_every_client_sends_at_least_once_and_one_at_a_time() -> None:
    in_flight: dict[int, int] = {}
    overlapping: list[int] = []
    sent: list[tuple[int, int]] = []

    async def send(client: int, sequence: int) -> RequestRecord:
        in_flight[client] = in_flight.get(client, 0) + 1
        if in_flight[client] > 1:
            overlapping.append(client)
        sent.append((client, sequence))
        await asyncio.sleep(0)
        in_flight[client] -= 1
        return _record(client)

    records, window = asyncio.run(run_closed_loop(4, 0.0, send))
    assert sorted(sent) == [(0, 0), (1, 0), (2, 0), (3, 0)]
    assert len(records) == 4
    assert overlapping == []
    assert window[0] <= window[1]


def test_a_client_stops_after_consecutive_errors() -> None:
    calls: list[int] = []

    async def send(client: int, sequence: int) -> RequestRecord:
        calls.append(sequence)
        await asyncio.sleep(0)
        return _record(client, error="UNAVAILABLE")

    records, _ = asyncio.run(run_closed_loop(1, 3600.0, send))
    assert calls == list(range(MAX_CONSECUTIVE_ERRORS))
    assert all(not record.ok for record in records)


def test_sequential_stops_at_max_requests() -> None:
    sequences: list[int] = []

    def send(client: int, sequence: int) -> RequestRecord:
        sequences.append(sequence)
        return _record(client)

    records, _ = run_sequential(3600.0, 5, send)
    assert sequences == [0, 1, 2, 3, 4]
    assert len(records) == 5
