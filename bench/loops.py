"""Closed-loop load: each client sends its next request as soon as its last one ended.

Clients start together and stop *starting* requests when the duration is over; the
requests in flight then finish normally (their latencies count; their tokens after the
steady window do not, see stats.py). A client that fails several times in a row stops,
so a dead server ends the level quickly instead of spinning.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable

from bench.config import BenchConfig
from bench.processes import CpuMeter, ServerProcess
from bench.records import LevelRun, RequestRecord
from bench.stats import steady_window

# (client index, that client's request number) -> the finished request
AsyncRequest = Callable[[int, int], Awaitable[RequestRecord]]
SyncRequest = Callable[[int, int], RequestRecord]
# (client index, request number, max new tokens) -> the finished request
ServerRequest = Callable[[int, int, int], Awaitable[RequestRecord]]

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


async def measure_server_levels(
    config: BenchConfig,
    scenario: str,
    server: ServerProcess,
    send: ServerRequest,
    collect: Callable[[LevelRun], None],
) -> None:
    """A server scenario's levels: one short warm-up request, then a closed loop at each
    stream count, metering the server's and this client's CPU, checking the server lived."""
    warm_up = await send(0, 0, 4)
    if not warm_up.ok:
        raise RuntimeError(f"the warm-up request failed: {warm_up.error}")
    for streams in config.streams:
        server_meter = CpuMeter(server.pid)
        client_meter = CpuMeter(os.getpid())
        records, window = await run_closed_loop(
            streams,
            config.duration_s,
            lambda client, sequence: send(client, sequence, config.max_new_tokens),
        )
        collect(
            LevelRun(
                scenario,
                streams,
                records,
                window,
                server=server_meter.finish(),
                client=client_meter.finish(with_memory=False),
            )
        )
        server.check_alive()
