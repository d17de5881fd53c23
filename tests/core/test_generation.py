from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import pytest
import trio

from llm_local.backends.base import BackendError
from llm_local.backends.fake import FakeBackend, FakeConfig
from llm_local.core.generation import run_generation
from llm_local.core.prompt import prepare_prompt
from llm_local.core.types import (
    NO_HINTS,
    Finished,
    FinishReason,
    GenerationHints,
    GenerationRequest,
    RequestContext,
    SamplingOptions,
    TextChunk,
)


async def loaded(**config: Any) -> FakeBackend:
    backend = FakeBackend(FakeConfig(**config))
    await backend.load()
    return backend


async def generate(
    backend: FakeBackend,
    prompt: str = "hi",
    max_new_tokens: int = 100,
    stop_sequences: tuple[str, ...] = (),
) -> tuple[list[TextChunk], Finished]:
    request = GenerationRequest(
        user_prompt=prompt, max_new_tokens=max_new_tokens, stop_sequences=stop_sequences
    )
    prepared = prepare_prompt(request, backend.tokenizer, backend.info.context_limit)
    chunks: list[TextChunk] = []

    async def on_text(chunk: TextChunk) -> None:
        chunks.append(chunk)

    finished = await run_generation(backend, request, prepared, on_text)
    return chunks, finished


async def test_the_tenant_reaches_the_backend_as_a_hint() -> None:
    backend = await loaded()
    request = GenerationRequest(
        user_prompt="hi", context=RequestContext(request_id="r1", tenant_id="acme")
    )
    prepared = prepare_prompt(request, backend.tokenizer, backend.info.context_limit)

    async def on_text(chunk: TextChunk) -> None:
        pass

    await run_generation(backend, request, prepared, on_text)
    assert backend.calls[0].hints.tenant_id == "acme"


def text_of(chunks: list[TextChunk]) -> str:
    return "".join(chunk.text for chunk in chunks)


async def test_end_token_finishes_with_stop_and_counts_itself() -> None:
    backend = await loaded(group_size=4)
    chunks, finished = await generate(backend, prompt="Merhaba, İstanbul 👋")
    reply = "Echo: Merhaba, İstanbul 👋"
    assert text_of(chunks) == reply
    assert finished.reason is FinishReason.STOP
    assert finished.completion_tokens == len(reply.encode()) + 1  # the end token counts
    assert finished.prompt_tokens == len(backend.calls[0].prompt_ids)
    assert finished.error is None


async def test_one_callback_per_backend_group() -> None:
    backend = await loaded(group_size=4)
    chunks, finished = await generate(backend, prompt="abcdefghij")  # "Echo: abcdefghij"
    assert [chunk.text for chunk in chunks] == ["Echo", ": ab", "cdef", "ghij"]
    assert [chunk.token_count for chunk in chunks] == [4, 4, 4, 4]
    assert finished.completion_tokens == 17


async def test_max_new_tokens_gives_length() -> None:
    backend = await loaded()
    chunks, finished = await generate(backend, max_new_tokens=5)
    assert text_of(chunks) == "Echo:"
    assert (finished.reason, finished.completion_tokens) == (FinishReason.LENGTH, 5)
    assert backend.calls[0].max_new_tokens == 5


async def test_stop_sequence_across_groups_cuts_before_it_and_stops_decoding() -> None:
    backend = await loaded(group_size=2)
    chunks, finished = await generate(backend, prompt="one two three four", stop_sequences=("two",))
    assert text_of(chunks) == "Echo: one "
    assert finished.reason is FinishReason.STOP
    # Counted up to the token that completed "two"; nothing after it was taken.
    assert finished.completion_tokens == len("Echo: one two")
    assert backend.stats().running == 0


async def test_partial_stop_match_is_released_when_generation_ends() -> None:
    backend = await loaded(group_size=3)
    chunks, finished = await generate(backend, prompt="wait...", stop_sequences=("...!",))
    assert text_of(chunks) == "Echo: wait..."
    assert finished.reason is FinishReason.STOP


async def test_clipped_to_the_context_gives_context_full() -> None:
    backend = await loaded()
    request = GenerationRequest(user_prompt="hi", max_new_tokens=100)
    prompt_length = len(backend.tokenizer.encode(_prompt_text(backend, request)))
    prepared = prepare_prompt(request, backend.tokenizer, context_limit=prompt_length + 3)
    assert (prepared.max_new_tokens, prepared.context_bound) == (3, True)
    chunks: list[TextChunk] = []

    async def on_text(chunk: TextChunk) -> None:
        chunks.append(chunk)

    finished = await run_generation(backend, request, prepared, on_text)
    assert text_of(chunks) == "Ech"
    assert (finished.reason, finished.completion_tokens) == (FinishReason.CONTEXT_FULL, 3)


def _prompt_text(backend: FakeBackend, request: GenerationRequest) -> str:
    return prepare_prompt(request, backend.tokenizer, 10_000).text


async def test_backend_error_sends_what_was_generated_then_finishes_with_error() -> None:
    backend = await loaded(group_size=4, fail_after_tokens=6)
    chunks, finished = await generate(backend, prompt="hello")
    assert text_of(chunks) == "Echo: "
    assert finished.reason is FinishReason.ERROR
    assert finished.error == "fake backend failed after 6 tokens"
    assert finished.completion_tokens == 6
    assert backend.stats().running == 0


async def test_backend_error_inside_a_multi_byte_character_flushes_what_the_decode_says() -> None:
    backend = await loaded(group_size=1, fail_after_tokens=7)  # "Echo: " + first byte of ğ
    chunks, finished = await generate(backend, prompt="ğ")
    assert text_of(chunks) == "Echo: \ufffd"
    assert finished.reason is FinishReason.ERROR


async def test_cancellation_propagates_and_leaves_nothing_running() -> None:
    backend = await loaded(group_size=1, token_delay_s=0.01)
    request = GenerationRequest(user_prompt="a long answer " * 10, max_new_tokens=200)
    prepared = prepare_prompt(request, backend.tokenizer, backend.info.context_limit)
    received: list[TextChunk] = []

    with trio.CancelScope() as scope:

        async def on_text(chunk: TextChunk) -> None:
            received.append(chunk)
            assert backend.stats().running == 1
            if len(received) == 3:
                scope.cancel()

        await run_generation(backend, request, prepared, on_text)
        pytest.fail("run_generation returned although it was cancelled")
    assert scope.cancelled_caught
    assert text_of(received) == "Ech"
    assert backend.stats().running == 0


async def test_cancellation_while_waiting_for_the_backend() -> None:
    backend = await loaded(token_delay_s=3600)
    with trio.move_on_after(0.05) as scope:
        await generate(backend)
    assert scope.cancelled_caught
    assert backend.stats().running == 0


class _StubBackend(FakeBackend):
    """Yields fixed groups (or raises a fixed error) whatever the prompt."""

    def __init__(self, groups: list[list[int]], error: BaseException | None = None) -> None:
        super().__init__()
        self._groups = groups
        self._error = error

    def generate(
        self,
        prompt_ids: Sequence[int],
        max_new_tokens: int,
        sampling: SamplingOptions,
        hints: GenerationHints = NO_HINTS,
    ) -> AbstractAsyncContextManager[AsyncIterator[Sequence[int]]]:
        return self._stub_stream()

    @asynccontextmanager
    async def _stub_stream(self) -> AsyncIterator[AsyncIterator[Sequence[int]]]:
        async def stream() -> AsyncIterator[Sequence[int]]:
            for group in self._groups:
                await trio.lowlevel.checkpoint()
                yield group
            if self._error is not None:
                raise self._error

        yield stream()


async def test_backend_ending_early_without_end_token_is_a_stop() -> None:
    backend = _StubBackend([list(b"ok")])
    chunks, finished = await generate(backend, max_new_tokens=50)
    assert text_of(chunks) == "ok"
    assert (finished.reason, finished.completion_tokens) == (FinishReason.STOP, 2)


async def test_ids_beyond_max_new_tokens_are_ignored() -> None:
    backend = _StubBackend([list(b"abcdef")])
    chunks, finished = await generate(backend, max_new_tokens=4)
    assert text_of(chunks) == "abcd"
    assert (finished.reason, finished.completion_tokens) == (FinishReason.LENGTH, 4)


async def test_backend_error_wrapped_in_an_exception_group_is_still_an_error() -> None:
    error = BaseExceptionGroup("worker", [BackendError("CUDA out of memory")])
    backend = _StubBackend([list(b"partial")], error=error)
    chunks, finished = await generate(backend)
    assert text_of(chunks) == "partial"
    assert (finished.reason, finished.error) == (FinishReason.ERROR, "CUDA out of memory")


async def test_other_errors_propagate() -> None:
    backend = _StubBackend([list(b"x")], error=RuntimeError("bug"))
    with pytest.raises(RuntimeError, match="bug"):
        await generate(backend)


class _CachingStream:
    """A backend stream that says how many prompt tokens came from its cache."""

    def __init__(self, groups: list[list[int]], cached: int) -> None:
        self._groups = iter(groups)
        self.cached_tokens = cached

    def __aiter__(self) -> _CachingStream:
        return self

    async def __anext__(self) -> Sequence[int]:
        await trio.lowlevel.checkpoint()
        for group in self._groups:
            return group
        raise StopAsyncIteration


class _CachingBackend(_StubBackend):
    def generate(
        self,
        prompt_ids: Sequence[int],
        max_new_tokens: int,
        sampling: SamplingOptions,
        hints: GenerationHints = NO_HINTS,
    ) -> AbstractAsyncContextManager[AsyncIterator[Sequence[int]]]:
        return self._caching()

    @asynccontextmanager
    async def _caching(self) -> AsyncIterator[AsyncIterator[Sequence[int]]]:
        yield _CachingStream(self._groups, cached=7)


async def test_the_prompt_tokens_a_backend_reused_reach_the_finish() -> None:
    _, finished = await generate(_CachingBackend([list(b"ok")]), max_new_tokens=50)
    assert finished.cached_tokens == 7
    _, plain = await generate(_StubBackend([list(b"ok")]), max_new_tokens=50)
    assert plain.cached_tokens == 0  # a stream that does not say: nothing reused
