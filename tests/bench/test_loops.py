"""bench/loops.py: the closed loop's shape (who sends what, when it stops); no timings."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import pytest

from bench.config import BenchConfig
from bench.loops import (
    MAX_CONSECUTIVE_ERRORS,
    measure_server_levels,
    run_closed_loop,
    run_sequential,
)
from bench.records import LevelRun, RequestRecord


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


class _ThisProcessAsServer:
    """Stands in for a ServerProcess: meters this very process, counts liveness checks."""

    pid = os.getpid()

    def __init__(self) -> None:
        self.checks = 0

    def check_alive(self) -> None:
        self.checks += 1


def test_server_levels_warm_up_then_run_each_stream_count() -> None:
    config = BenchConfig(streams=(1, 3), duration_s=0.0, max_new_tokens=7)
    server = _ThisProcessAsServer()
    sent: list[tuple[int, int, int]] = []
    levels: list[LevelRun] = []

    async def send(client: int, sequence: int, max_new_tokens: int) -> RequestRecord:
        sent.append((client, sequence, max_new_tokens))
        return _record(client)

    server_process: Any = server
    asyncio.run(measure_server_levels(config, "grpc", server_process, send, levels.append))

    assert sent[0] == (0, 0, 4)  # the short warm-up request
    assert sorted(sent[1:]) == [(0, 0, 7), (0, 0, 7), (1, 0, 7), (2, 0, 7)]
    assert [(level.scenario, level.streams, len(level.records)) for level in levels] == [
        ("grpc", 1, 1),
        ("grpc", 3, 3),
    ]
    assert all(level.server is not None and level.client is not None for level in levels)
    assert server.checks == 2


def test_a_failed_warm_up_stops_before_any_level() -> None:
    levels: list[LevelRun] = []

    async def send(client: int, sequence: int, max_new_tokens: int) -> RequestRecord:
        return _record(client, error="UNAVAILABLE: no server")

    server_process: Any = _ThisProcessAsServer()
    with pytest.raises(RuntimeError, match="warm-up request failed: UNAVAILABLE: no server"):
        asyncio.run(
            measure_server_levels(BenchConfig(), "grpc", server_process, send, levels.append)
        )
    assert levels == []
