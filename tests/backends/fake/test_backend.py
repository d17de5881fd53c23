from __future__ import annotations

import math
from collections.abc import Sequence

import pytest
import trio
import trio.testing

from llm_local.backends.base import BackendError, BackendLoadError
from llm_local.backends.fake import IM_END, FakeBackend, FakeConfig
from llm_local.core.types import SamplingOptions

GREEDY = SamplingOptions()


def chatml(user: str) -> list[int]:
    return FakeBackend().tokenizer.encode(
        f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
    )


async def collect(backend: FakeBackend, prompt_ids: Sequence[int], limit: int) -> list[list[int]]:
    async with backend.generate(prompt_ids, limit, GREEDY) as stream:
        return [list(group) async for group in stream]


async def test_answers_echo_of_the_last_user_message_then_end_token() -> None:
    backend = FakeBackend(FakeConfig(group_size=3))
    await backend.load()
    prompt = backend.tokenizer.encode(
        "<|im_start|>user\nfirst<|im_end|>\n<|im_start|>assistant\nok<|im_end|>\n"
        "<|im_start|>user\nçay?<|im_end|>\n<|im_start|>assistant\n"
    )
    groups = await collect(backend, prompt, 100)
    ids = [token for group in groups for token in group]
    assert ids == [*"Echo: çay?".encode(), IM_END]
    assert all(len(group) == 3 for group in groups[:-1])
    assert backend.calls[0].prompt_ids == tuple(prompt)


async def test_plain_format_prompt_is_understood_too() -> None:
    backend = FakeBackend()
    await backend.load()
    prompt = backend.tokenizer.encode("System: s\n\nUser: a\nAssistant: b\nUser: q?\nAssistant:")
    ids = [token for group in await collect(backend, prompt, 100) for token in group]
    assert backend.tokenizer.decode(ids) == "Echo: q?"


async def test_configured_reply_and_max_new_tokens() -> None:
    backend = FakeBackend(FakeConfig(reply="You said {prompt}!"))
    await backend.load()
    ids = [token for group in await collect(backend, chatml("hi"), 100) for token in group]
    assert backend.tokenizer.decode(ids) == "You said hi!"
    ids = [token for group in await collect(backend, chatml("hi"), 5) for token in group]
    assert ids == list(b"You s")


async def test_generate_before_load_or_after_close_is_an_error() -> None:
    backend = FakeBackend()
    with pytest.raises(BackendError, match="not loaded"):
        await collect(backend, chatml("hi"), 5)
    await backend.load()
    await backend.aclose()
    with pytest.raises(BackendError, match="closed"):
        await collect(backend, chatml("hi"), 5)


async def test_close_stops_running_generations() -> None:
    backend = FakeBackend(FakeConfig(group_size=1))
    await backend.load()
    with pytest.raises(BackendError, match="closed during generation"):
        async with backend.generate(chatml("hi"), 50, GREEDY) as stream:
            async for _group in stream:
                await backend.aclose()
    assert backend.stats().running == 0


async def test_fails_after_the_configured_number_of_tokens() -> None:
    backend = FakeBackend(FakeConfig(group_size=4, fail_after_tokens=6))
    await backend.load()
    received: list[int] = []
    with pytest.raises(BackendError, match="after 6 tokens"):
        async with backend.generate(chatml("hello"), 50, GREEDY) as stream:
            async for group in stream:
                received.extend(group)
    assert received == list(b"Echo: ")


async def test_leaving_the_context_stops_and_running_counts_it() -> None:
    backend = FakeBackend(FakeConfig(group_size=1, token_delay_s=3600))
    await backend.load()
    entered = trio.Event()

    async def generate() -> None:
        async with backend.generate(chatml("hi"), 50, GREEDY) as stream:
            entered.set()
            async for _group in stream:
                pytest.fail("a token arrived although each takes an hour")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(generate)
        await entered.wait()
        await trio.testing.wait_all_tasks_blocked()
        assert backend.stats().running == 1
        nursery.cancel_scope.cancel()
    assert backend.stats().running == 0


async def test_token_delay_paces_the_groups(autojump_clock: trio.testing.MockClock) -> None:
    backend = FakeBackend(FakeConfig(group_size=2, token_delay_s=0.5))
    await backend.load()
    start = trio.current_time()
    groups = await collect(backend, chatml("ab"), 100)  # "Echo: ab" + end = 9 ids
    assert len(groups) == 5
    assert trio.current_time() - start == pytest.approx(9 * 0.5)


async def test_load_delay_and_failures(autojump_clock: trio.testing.MockClock) -> None:
    backend = FakeBackend(FakeConfig(load_delay_s=2.0, load_failures=2))
    start = trio.current_time()
    for _attempt in range(2):
        with pytest.raises(BackendLoadError, match="told to fail"):
            await backend.load()
        assert not backend.loaded
    await backend.load()
    assert backend.loaded
    assert trio.current_time() - start == pytest.approx(6.0)


@pytest.mark.parametrize(
    ("raw", "failures", "reason"),
    [
        ({}, 0, "fake backend told to fail loading"),
        ({"fail_load": True}, math.inf, "fake backend told to fail loading"),
        ({"FAIL_LOAD": 2}, 2, "fake backend told to fail loading"),
        ({"fail_load": "weights are corrupt"}, math.inf, "weights are corrupt"),
    ],
)
def test_config_from_settings_table(raw: dict[str, object], failures: float, reason: str) -> None:
    config = FakeConfig.from_mapping(raw)
    assert (config.load_failures, config.load_failure_reason) == (failures, reason)


def test_config_rejects_unknown_keys_and_bad_values() -> None:
    with pytest.raises(ValueError, match="unknown fake backend settings: tokn_delay"):
        FakeConfig.from_mapping({"tokn_delay": 1})
    with pytest.raises(ValueError, match="group_size"):
        FakeConfig.from_mapping({"group_size": 0})
    with pytest.raises(ValueError, match="token_delay_s"):
        FakeConfig.from_mapping({"token_delay_s": -1})


def test_config_keys_reach_the_backend() -> None:
    config = FakeConfig.from_mapping(
        {"token_delay_s": 0.1, "reply": "x", "context_limit": 64, "model_name": "tiny"}
    )
    backend = FakeBackend(config)
    assert (backend.info.model_name, backend.info.context_limit) == ("tiny", 64)
    assert backend.info.backend == "fake"
