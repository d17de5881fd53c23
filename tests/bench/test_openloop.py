"""bench/openloop.py: requests go out on schedule whatever is still running."""

from __future__ import annotations

import asyncio
import time

import pytest

from bench.openloop import SendGateway, run_open_loop
from bench.records import RequestRecord
from bench.workload import Arrival, GatewayRequest, request_at


def arrivals(*offsets: float) -> list[Arrival]:
    return [Arrival(offset, request_at(seed=1, index=i)) for i, offset in enumerate(offsets)]


def slow_server(seconds: float, started: list[float]) -> SendGateway:
    """A server that answers one token after `seconds`, noting when each request came."""

    async def send(request: GatewayRequest) -> RequestRecord:
        start = time.perf_counter()
        started.append(start)
        await asyncio.sleep(seconds)
        end = time.perf_counter()
        return RequestRecord.streamed(request.index, start, end, [end], tokens=1)

    return send


def test_each_request_is_sent_at_its_arrival_time_not_after_the_previous_one() -> None:
    started: list[float] = []
    records, (low, high) = asyncio.run(
        run_open_loop(
            arrivals(0.0, 0.05, 0.1),
            slow_server(1.0, started),
            window_s=0.2,
            drain_s=5.0,
            max_in_flight=10,
        )
    )
    assert all(record.ok for record in records)
    assert [record.client for record in records] == [0, 1, 2]
    # All three were sent before the first one (1 s long) ended.
    assert max(started) < min(record.end for record in records)
    assert started == sorted(started)
    assert high - low == pytest.approx(0.2)


def test_a_request_still_running_after_the_drain_is_cancelled_and_failed() -> None:
    records, _ = asyncio.run(
        run_open_loop(
            arrivals(0.0), slow_server(30.0, []), window_s=0.05, drain_s=0.1, max_in_flight=10
        )
    )
    (record,) = records
    assert not record.ok and record.error is not None
    assert record.error.startswith("cancelled: still running 0.1 s after the arrival window")


def test_arrivals_beyond_the_safety_bound_are_recorded_as_failed() -> None:
    records, _ = asyncio.run(
        run_open_loop(
            arrivals(0.0, 0.01), slow_server(0.2, []), window_s=0.05, drain_s=5.0, max_in_flight=1
        )
    )
    assert records[0].ok
    assert records[1].error == "not sent: 1 requests already in flight (the client's safety bound)"
