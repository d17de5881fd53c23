"""bench/scenarios/gateway.py: the probe before the sweep."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import pytest

from bench.config import LLAMA_CPP_SLOTS, BenchConfig
from bench.records import RequestRecord
from bench.scenarios.gateway import (
    PROBE_REQUESTS,
    SATURATION_FIRST_INDEX,
    _one_request_alone,
    saturated_throughput,
)
from bench.workload import TENANTS, GatewayRequest


async def test_the_probe_times_one_request_alone_and_reads_every_tenant_s_persona() -> None:
    sent: list[GatewayRequest] = []

    async def send(request: GatewayRequest) -> RequestRecord:
        sent.append(request)
        took = 1.0 + len(sent)  # the n-th request sent takes n + 1 s
        return RequestRecord(client=0, start=0.0, end=took, tokens=8, first_token=0.5)

    alone_s = await _one_request_alone(BenchConfig(), send)

    # The first request warms up; the next ones are timed: 3, 4 and 5 s.
    assert alone_s == 4.0
    assert {request.tenant for request in sent} == {tenant.name for tenant in TENANTS}
    # Beyond the timed ones, only a tenant not seen yet is sent, once.
    extra = [request.tenant for request in sent[PROBE_REQUESTS:]]
    assert len(extra) == len(set(extra))
    assert not set(extra) & {request.tenant for request in sent[:PROBE_REQUESTS]}


def test_saturation_keeps_every_client_busy_with_requests_no_level_sends() -> None:
    """(asyncio, as the bench's clients: not the suite's trio.)"""
    sent: list[GatewayRequest] = []
    in_flight = 0
    most_in_flight = 0

    async def send(request: GatewayRequest) -> RequestRecord:
        nonlocal in_flight, most_in_flight
        sent.append(request)
        in_flight += 1
        most_in_flight = max(most_in_flight, in_flight)
        start = time.perf_counter()
        await asyncio.sleep(0.01)
        in_flight -= 1
        end = time.perf_counter()
        return RequestRecord(client=request.index, start=start, end=end, tokens=8, first_token=end)

    config = dataclasses.replace(BenchConfig(), gateway_saturation_s=0.2)
    saturated = asyncio.run(saturated_throughput(config, send))

    assert most_in_flight == saturated.in_flight == LLAMA_CPP_SLOTS
    indices = [request.index for request in sent]
    assert len(set(indices)) == len(indices)
    assert min(indices) >= SATURATION_FIRST_INDEX
    assert saturated.requests_per_s > 0
    # Every request here generates 8 tokens, all at its end.
    assert saturated.tokens_per_s == pytest.approx(8 * saturated.requests_per_s, rel=0.5)
