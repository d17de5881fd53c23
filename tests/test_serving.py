"""The request flow's logging of prompts: never, unless logging.log_prompts is on."""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest
import trio

from llm_local.app import RunningService, run_service
from llm_local.core.state import Phase
from llm_local.core.types import TextChunk
from llm_local.core.validation import RawRequest
from llm_local.serving import CallError, CallMetadata
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
