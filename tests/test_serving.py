"""The flow's handling of a client that stops reading, on the fake backend."""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest
import trio

from llm_local.app import build_service
from llm_local.core.types import TextChunk
from llm_local.core.validation import RawParams, RawRequest
from llm_local.service import Service
from llm_local.serving import CallMetadata, ClientStalled, GenerationFlow
from llm_local.settings.schema import AppSettings

STALL_S = 0.2


async def ready_service(fake_settings: Callable[..., AppSettings]) -> Service:
    settings = fake_settings({"token_delay_s": 0.001}, server__stall_timeout_s=STALL_S)
    service = build_service(settings)
    await service.backend.load()
    service.state.mark_ready(service.backend.info)
    return service


async def test_a_client_that_stops_reading_is_cancelled_and_frees_its_slot(
    fake_settings: Callable[..., AppSettings], caplog: pytest.LogCaptureFixture
) -> None:
    service = await ready_service(fake_settings)
    flow = GenerationFlow(service)
    taken: list[str] = []

    async def reads_twice_then_stops(chunk: TextChunk) -> None:
        if len(taken) == 2:
            await trio.sleep_forever()  # the send never completes: a full window
        taken.append(chunk.text)

    caplog.set_level(logging.WARNING, logger="llm_local.request")
    with trio.fail_after(10):
        started = trio.current_time()
        with pytest.raises(ClientStalled, match="client stopped reading"):
            await flow.generate(
                "LlamaService",
                RawRequest(user_prompt="hello", params=RawParams(max_new_tokens=64)),
                CallMetadata(tenant_id="slow"),
                reads_twice_then_stops,
            )
        waited = trio.current_time() - started
    assert waited >= STALL_S
    assert len(taken) == 2
    assert (service.admission.running, service.admission.queued, flow.in_flight) == (0, 0, 0)
    assert service.backend.stats().running == 0
    assert any("stall_timeout_s" in r.getMessage() for r in caplog.records)
    body = service.metrics.render()[0].decode()
    assert 'llm_local_streams_stalled_total{service="LlamaService"} 1.0' in body
    assert 'llm_local_tenant_requests_total{code="CANCELLED",tenant="slow"} 1.0' in body


async def test_a_slow_but_steady_reader_is_not_cancelled(
    fake_settings: Callable[..., AppSettings],
) -> None:
    service = await ready_service(fake_settings)
    flow = GenerationFlow(service)

    async def slow_reader(chunk: TextChunk) -> None:
        await trio.sleep(STALL_S / 4)  # each send takes a while, none takes too long

    with trio.fail_after(30):
        finished = await flow.generate(
            "LlamaService",
            RawRequest(user_prompt="hello", params=RawParams(max_new_tokens=12)),
            CallMetadata(),
            slow_reader,
        )
    assert finished.completion_tokens == 12
