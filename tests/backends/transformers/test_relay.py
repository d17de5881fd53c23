"""TokenRelay: transformers' per-step outputs become each request's token groups in trio.

No model: the outputs are what transformers' generation thread hands its router (request
id, every generated token so far, status, error), delivered from a real thread.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import trio
import trio.testing

from llm_local.backends.base import BackendError
from llm_local.backends.shared.bridge import BatchItem, WakeupRelay
from llm_local.backends.transformers.relay import TokenRelay, make_output_router
from llm_local.core.types import SamplingOptions


@dataclass
class Output:
    """The fields of transformers' GenerationOutput the relay reads."""

    request_id: str
    generated_tokens: list[int] = field(default_factory=list)
    finished: bool = False
    error: str | None = None

    def is_finished(self) -> bool:
        return self.finished or self.error is not None


def new_item(max_new_tokens: int = 10) -> BatchItem:
    relay = WakeupRelay(trio.lowlevel.current_trio_token())
    return BatchItem([1, 2, 3], max_new_tokens, SamplingOptions(), arrived_at=0.0, relay=relay)


async def collect(item: BatchItem) -> list[int]:
    tokens: list[int] = []
    async for group in item.stream():
        tokens.extend(group)
    return tokens


async def test_streamed_outputs_pass_only_new_tokens_and_the_last_ends_the_stream() -> None:
    relay, item = TokenRelay(), new_item()
    relay.track("a", item)
    steps = [Output("a", [5]), Output("a", [5, 6]), Output("a", [5, 6, 7], finished=True)]

    def generation_thread() -> None:
        relay.deliver_batch(steps[:2])
        relay.deliver(steps[2])

    await trio.to_thread.run_sync(generation_thread)

    assert await collect(item) == [5, 6, 7]
    relay.deliver(Output("a", [5, 6, 7, 8]))  # finished: no longer tracked, dropped
    assert not item.active


async def test_a_failed_output_fails_the_stream_with_its_error() -> None:
    relay, item = TokenRelay(), new_item()
    relay.track("a", item)

    await trio.to_thread.run_sync(relay.deliver, Output("a", [5], error="CUDA out of memory"))

    with pytest.raises(BackendError, match="CUDA out of memory"):
        await collect(item)


async def error_ending_a_waiting_consumer(relay: TokenRelay, item: BatchItem, last: Output) -> str:
    """`last` delivered from the generation thread while the consumer already waits: its
    wake-up must cross into trio through the relay, never set trio's event from that
    thread (trio refuses it: not in async context). The error the stream ended with."""
    failures: list[BackendError] = []

    async def consume() -> None:
        try:
            await collect(item)
        except BackendError as error:
            failures.append(error)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(consume)
        await trio.testing.wait_all_tasks_blocked()
        await trio.to_thread.run_sync(relay.deliver, last)
    assert len(failures) == 1
    return str(failures[0])


async def test_a_failure_reaches_a_consumer_already_waiting_from_the_generation_thread() -> None:
    relay, item = TokenRelay(), new_item()
    relay.track("a", item)
    failed = Output("a", [], error="CUDA out of memory")
    assert "CUDA out of memory" in await error_ending_a_waiting_consumer(relay, item, failed)


async def test_a_last_output_with_no_new_token_ends_a_waiting_consumer() -> None:
    relay, item = TokenRelay(), new_item()
    relay.track("a", item)
    await trio.to_thread.run_sync(relay.deliver, Output("a", [5]))
    assert await item.next_group() == [5]
    finished = Output("a", [5], finished=True)
    # Ended by the engine with fewer tokens than asked and no end token: an early end.
    assert "without an end token" in await error_ending_a_waiting_consumer(relay, item, finished)
    assert not item.active


async def test_outputs_of_a_forgotten_request_are_dropped_and_others_still_flow() -> None:
    relay, gone, staying = TokenRelay(), new_item(), new_item()
    relay.track("gone", gone)
    relay.track("staying", staying)
    relay.forget("gone")

    await trio.to_thread.run_sync(
        relay.deliver_batch,
        [Output("gone", [9]), Output("staying", [4, 2], finished=True)],
    )

    assert await collect(staying) == [4, 2]
    assert gone.active  # never fed: the trio side cancels it in the manager


async def test_fail_all_ends_every_tracked_stream_with_the_error() -> None:
    relay, first, second = TokenRelay(), new_item(), new_item()
    relay.track("1", first)
    relay.track("2", second)

    relay.fail_all(BackendError("the backend is closing"))

    for item in (first, second):
        with pytest.raises(BackendError, match="closing"):
            await collect(item)


async def test_the_router_transformers_calls_delivers_to_the_relay() -> None:
    relay, item = TokenRelay(), new_item(max_new_tokens=2)
    relay.track("a", item)
    router = make_output_router(relay)

    await trio.to_thread.run_sync(router.deliver_batch, [Output("a", [3, 4])])

    # max_new_tokens reached: the item ends even before transformers says so.
    assert await collect(item) == [3, 4]
