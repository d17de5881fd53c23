"""Open-loop load: each request is sent at its arrival time, whatever is still running.

A gateway does not wait for one call's answer before the next caller speaks, so a
closed loop (where a slow server slows its own load down) hides queueing. Here the
schedule alone decides when requests go out. Two bounds keep a level finite:

- a safety bound on requests in flight (`max_in_flight`, far above what any server here
  holds): an arrival beyond it is not sent and is recorded as a failed request;
- a drain time after the arrival window: a request still running then is cancelled and
  recorded as failed. The drain is chosen (by the caller) so that such a request has
  certainly missed the SLO already, so cancelling it changes no verdict.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence

from bench.records import RequestRecord
from bench.workload import Arrival, GatewayRequest

SendGateway = Callable[[GatewayRequest], Awaitable[RequestRecord]]

DROPPED = "not sent: {limit} requests already in flight (the client's safety bound)"
CANCELLED = "cancelled: still running {drain:.1f} s after the arrival window ended"


async def run_open_loop(
    arrivals: Sequence[Arrival],
    send: SendGateway,
    *,
    window_s: float,
    drain_s: float,
    max_in_flight: int,
) -> tuple[tuple[RequestRecord, ...], tuple[float, float]]:
    """Send every arrival on time; the records (in arrival order) and the window."""
    if max_in_flight < 1:
        raise ValueError(f"max_in_flight must be at least 1, got {max_in_flight}")
    started = time.perf_counter()
    deadline = started + window_s + drain_s
    records: list[RequestRecord | None] = [None] * len(arrivals)
    in_flight: set[asyncio.Task[None]] = set()

    async def one(position: int, request: GatewayRequest) -> None:
        sent = time.perf_counter()
        try:
            async with asyncio.timeout_at(_loop_time_at(deadline)):
                records[position] = await send(request)
        except TimeoutError:
            error = CANCELLED.format(drain=drain_s)
            records[position] = _failed(request, sent, time.perf_counter(), error)

    for position, arrival in enumerate(arrivals):
        delay = started + arrival.offset_s - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if len(in_flight) >= max_in_flight:
            now = time.perf_counter()
            error = DROPPED.format(limit=max_in_flight)
            records[position] = _failed(arrival.request, now, now, error)
            continue
        task = asyncio.create_task(one(position, arrival.request))
        in_flight.add(task)
        task.add_done_callback(in_flight.discard)
    if in_flight:
        await asyncio.gather(*in_flight)
    finished = [record for record in records if record is not None]
    return tuple(finished), (started, started + window_s)


def _loop_time_at(moment: float) -> float:
    """A perf_counter moment on the event loop's clock."""
    return asyncio.get_running_loop().time() + (moment - time.perf_counter())


def _failed(request: GatewayRequest, start: float, end: float, error: str) -> RequestRecord:
    return RequestRecord(client=request.index, start=start, end=end, tokens=0, error=error)
