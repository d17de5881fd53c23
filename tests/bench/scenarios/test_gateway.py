"""bench/scenarios/gateway.py: the probe before the sweep."""

from __future__ import annotations

from bench.config import BenchConfig
from bench.records import RequestRecord
from bench.scenarios.gateway import PROBE_REQUESTS, _one_request_alone
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
