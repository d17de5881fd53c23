"""Closed-loop load: each client sends its next request as soon as its last one ended.

Clients start together and stop *starting* requests when the duration is over; the
requests in flight then finish normally (their latencies count; their tokens after the
steady window do not, see stats.py). A client that fails several times in a row stops,
so a dead server ends the level quickly instead of spinning.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from bench.records import RequestRecord
from bench.stats import steady_window

# (client index, that client's request number) -> the finished request
AsyncRequest = Callable[[int, int], Awaitable[RequestRecord]]
SyncRequest = Callable[[int, int], RequestRecord]

MAX_CONSECUTIVE_ERRORS = 3


async def run_closed_loop(
    streams: int, duration_s: float, send: AsyncRequest
) -> tuple[tuple[RequestRecord, ...], tuple[float, float]]:
    """Run `streams` closed-loop clients for `duration_s`; records and steady window."""
    if streams < 1:
        raise ValueError(f"streams must be at least 1, got {streams}")
    records: list[RequestRecord] = []
    started = time.perf_counter()
    deadline = started + duration_s

    async def client(index: int) -> None:
        sequence = 0
        consecutive_errors = 0
        # Every client sends at least one request, however short the duration.
        while sequence == 0 or time.perf_counter() < deadline:
            record = await send(index, sequence)
            records.append(record)
            sequence += 1
            consecutive_errors = 0 if record.ok else consecutive_errors + 1
            if consecutive_errors >= MAX_CONSECUTIVE_ERRORS:
                return

    async with asyncio.TaskGroup() as group:
        for index in range(streams):
            group.create_task(client(index))
    return tuple(records), steady_window(records, started)


def run_sequential(
    duration_s: float, max_requests: int, send: SyncRequest
) -> tuple[tuple[RequestRecord, ...], tuple[float, float]]:
    """One client in this thread: the closed loop for blocking, in-process generation."""
    records: list[RequestRecord] = []
    started = time.perf_counter()
    deadline = started + duration_s
    consecutive_errors = 0
    while not records or (time.perf_counter() < deadline and len(records) < max_requests):
        record = send(0, len(records))
        records.append(record)
        consecutive_errors = 0 if record.ok else consecutive_errors + 1
        if consecutive_errors >= MAX_CONSECUTIVE_ERRORS:
            break
    return tuple(records), steady_window(records, started)
