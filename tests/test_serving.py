"""The request flow: prompts never reach a log line unless logging.log_prompts is on; a
client that stops reading is cancelled (on the fake backend)."""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest
import trio

from llm_local.app import RunningService, build_service, run_service
from llm_local.core.state import Phase
from llm_local.core.types import TextChunk
from llm_local.core.validation import RawParams, RawRequest
from llm_local.service import Service
from llm_local.serving import CallError, CallMetadata, ClientStalled, GenerationFlow
from llm_local.settings.schema import AppSettings

SettingsFor = Callable[..., AppSettings]
PROMPT = "my-private-question-7d1e"
SYSTEM = "my-private-system-prompt-42ab"


async def _ignore(chunk: TextChunk) -> None:
    pass


async def log_of_two_requests(settings: AppSettings, caplog: pytest.LogCaptureFixture) -> str:
    """Every log line (DEBUG and up) of one served and one refused request."""
    caplog.set_level(logging.DEBUG)
    async with trio.open_nursery() as nursery:
        running: RunningService = await nursery.start(run_service, settings)
        with trio.fail_after(10):
            while running.service.state.phase is not Phase.READY:
                await running.service.state.wait_for_change(running.service.state.version)
        served = RawRequest(PROMPT, system_prompt=SYSTEM, history=(("user", PROMPT),))
        await running.flow.generate("test", served, CallMetadata(), _ignore)
        with pytest.raises(CallError):
            refused = RawRequest(PROMPT, system_prompt=SYSTEM, history=(("wizard", PROMPT),))
            await running.flow.generate("test", refused, CallMetadata(), _ignore)
        running.stop.set()
    return "\n".join(f"{record.getMessage()} {vars(record)}" for record in caplog.records)


async def test_no_log_line_carries_a_prompt_by_default(
    fake_settings: SettingsFor, caplog: pytest.LogCaptureFixture
) -> None:
    text = await log_of_two_requests(fake_settings(logging__level="DEBUG"), caplog)

    assert "request finished" in text  # the lines were captured
    assert PROMPT not in text
    assert SYSTEM not in text


async def test_prompts_are_logged_at_debug_when_switched_on(
    fake_settings: SettingsFor, caplog: pytest.LogCaptureFixture
) -> None:
    settings = fake_settings(logging__level="DEBUG", logging__log_prompts=True)

    text = await log_of_two_requests(settings, caplog)

    prompt_lines = [r for r in caplog.records if r.getMessage() == "prompt"]
    assert len(prompt_lines) == 2
    assert all(record.levelno == logging.DEBUG for record in prompt_lines)
    assert PROMPT in text and SYSTEM in text


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
