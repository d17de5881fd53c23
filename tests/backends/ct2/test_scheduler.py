"""The batching scheduler with a scripted decoder in place of CTranslate2 (no model).

The decoder runs on the scheduler's worker threads like CTranslate2 does and talks to
the items through the same callback (`offer_token`), so queueing, per-item stopping,
failures and shutdown are exercised for real; only the token ids are made up: item
with prompt [p] gets tokens p*1000, p*1000+1, ...
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import AsyncIterator, Sequence

import pytest
import trio
import trio.testing

from llm_local.backends.base import BackendError, BackendStats
from llm_local.backends.ct2.scheduler import BatchScheduler, BatchStarted, SchedulerClosedError
from llm_local.backends.shared.bridge import BatchItem, WakeupRelay
from llm_local.backends.shared.costs import CostEstimate
from llm_local.core.types import SamplingOptions

GREEDY = SamplingOptions()
SAMPLED = SamplingOptions(temperature=0.8, top_k=20)
POISON = 666  # a batch holding it raises an Exception
THREAD_EXIT = 667  # a batch holding it ends its thread with SystemExit (not an Exception)
# Reading a prompt token costs so much that restarting a batch never pays.
NEVER_MERGE = CostEstimate(step_base_s=0.001, step_per_item_s=0.0, prefill_token_s=1e6)
# Reading prompt tokens is free: restarting a batch for newcomers always pays.
ALWAYS_MERGE = CostEstimate(step_base_s=0.001, step_per_item_s=0.0, prefill_token_s=0.0)


class ScriptedDecoder:
    """Stands in for generate_batch: one token per item per step, until each item stops."""

    def __init__(self) -> None:
        self.gate = threading.Event()  # batches start decoding once this is set
        self.gate.set()
        self.started = threading.Semaphore(0)  # released as each batch begins
        self.batches: list[list[int]] = []
        self.offers: dict[int, int] = {}  # prompt id -> tokens offered
        self.active = 0  # batches being decoded now

    def __call__(self, batch: Sequence[BatchItem]) -> None:
        self.batches.append(sorted(item.prompt_ids[0] for item in batch))
        self.active += 1
        try:
            self._decode(batch)
        finally:
            self.active -= 1

    def _decode(self, batch: Sequence[BatchItem]) -> None:
        self.started.release()
        if not self.gate.wait(timeout=30):
            raise RuntimeError("the test never opened the gate")
        if any(item.prompt_ids[0] == POISON for item in batch):
            raise RuntimeError("poisoned batch")
        if any(item.prompt_ids[0] == THREAD_EXIT for item in batch):
            raise SystemExit("a library called sys.exit() on the decoding thread")
        limit = max(item.remaining_new_tokens for item in batch)
        alive = list(range(len(batch)))
        for step in range(limit):
            for index in list(alive):
                item = batch[index]
                prompt = item.prompt_ids[0]
                self.offers[prompt] = self.offers.get(prompt, 0) + 1
                # A re-queued item's prompt carries its tokens so far: it continues.
                position = len(item.prompt_ids) - 1 + step
                if item.offer_token(prompt * 1000 + position, step == limit - 1):
                    alive.remove(index)
            if not alive:
                return
            time.sleep(0.001)  # a decoding step takes time: lets consumers act mid-batch


def new_item(prompt: int, max_new_tokens: int, sampling: SamplingOptions = GREEDY) -> BatchItem:
    return BatchItem(
        [prompt],
        max_new_tokens,
        sampling,
        arrived_at=trio.current_time(),
        relay=WakeupRelay(trio.lowlevel.current_trio_token()),
    )


async def collect(scheduler: BatchScheduler, item: BatchItem) -> list[int]:
    tokens: list[int] = []
    async with scheduler.generation(item) as stream:
        async for group in stream:
            tokens.extend(group)
    return tokens


def make_scheduler(
    decoder: ScriptedDecoder,
    *,
    workers: int = 2,
    max_batch_size: int = 8,
    batch_wait_s: float = 0.005,
    max_queued: int = 64,
    on_batch: list[BatchStarted] | None = None,
    busy_batch_wait_s: float | None = None,
    costs: CostEstimate = NEVER_MERGE,  # most tests look at batches merging would change
    ttft_target_s: float = math.inf,
    lanes: int = 0,
) -> BatchScheduler:
    scheduler = BatchScheduler(
        decoder,
        workers=workers,
        max_batch_size=max_batch_size,
        batch_wait_s=batch_wait_s,
        max_queued=max_queued,
        min_split_size=8,  # these tests look at batches the splitting would not touch
        on_batch=None if on_batch is None else on_batch.append,
        busy_batch_wait_s=busy_batch_wait_s,
        costs=lambda: costs,
        ttft_target_s=ttft_target_s,
        lanes=lanes,
    )
    scheduler.start()
    return scheduler


@pytest.fixture
def decoder() -> ScriptedDecoder:
    return ScriptedDecoder()


@pytest.fixture
async def scheduler(decoder: ScriptedDecoder) -> AsyncIterator[BatchScheduler]:
    scheduler = make_scheduler(decoder)
    yield scheduler
    decoder.gate.set()
    await scheduler.aclose()


async def test_each_item_gets_its_own_tokens_and_its_own_length(
    scheduler: BatchScheduler, decoder: ScriptedDecoder
) -> None:
    results: dict[int, list[int]] = {}

    async def run(prompt: int, max_new_tokens: int) -> None:
        results[prompt] = await collect(scheduler, new_item(prompt, max_new_tokens))

    async with trio.open_nursery() as nursery:
        for prompt, length in [(1, 3), (2, 7), (3, 1), (4, 5)]:
            nursery.start_soon(run, prompt, length)

    assert results == {
        1: [1000, 1001, 1002],
        2: [2000 + step for step in range(7)],
        3: [3000],
        4: [4000 + step for step in range(5)],
    }
    assert decoder.batches == [[1, 2, 3, 4]]


async def test_mixed_sampling_options_go_to_separate_batches(decoder: ScriptedDecoder) -> None:
    started: list[BatchStarted] = []
    scheduler = make_scheduler(decoder, on_batch=started)
    async with trio.open_nursery() as nursery:
        for prompt in (1, 2, 3):
            nursery.start_soon(collect, scheduler, new_item(prompt, 2, GREEDY))
        for prompt in (4, 5):
            nursery.start_soon(collect, scheduler, new_item(prompt, 2, SAMPLED))
    await scheduler.aclose()
    assert sorted(decoder.batches) == [[1, 2, 3], [4, 5]]
    assert {event.batch_key: event.size for event in started} == {
        GREEDY.batch_key(): 3,
        SAMPLED.batch_key(): 2,
    }


async def test_requests_arriving_while_workers_are_busy_join_the_next_batch(
    decoder: ScriptedDecoder,
) -> None:
    scheduler = make_scheduler(decoder, workers=1)
    decoder.gate.clear()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(collect, scheduler, new_item(1, 2))
        await trio.to_thread.run_sync(decoder.started.acquire)
        for prompt in (2, 3, 4):
            nursery.start_soon(collect, scheduler, new_item(prompt, 2))
        await trio.testing.wait_all_tasks_blocked()
        assert scheduler.stats().queued == 3
        decoder.gate.set()
    await scheduler.aclose()
    assert decoder.batches == [[1], [2, 3, 4]]


async def test_the_queue_stays_bounded(decoder: ScriptedDecoder) -> None:
    scheduler = make_scheduler(decoder, workers=1, max_batch_size=1, max_queued=2)
    decoder.gate.clear()
    results: list[list[int]] = []

    async def run(prompt: int) -> None:
        results.append(await collect(scheduler, new_item(prompt, 1)))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run, 1)
        await trio.to_thread.run_sync(decoder.started.acquire)
        for prompt in (2, 3, 4, 5):
            nursery.start_soon(run, prompt)
        await trio.testing.wait_all_tasks_blocked()
        # Two wait in the queue; the others wait to enter it.
        assert scheduler.stats().queued == 2
        decoder.gate.set()
    await scheduler.aclose()
    assert sorted(results) == [[1000], [2000], [3000], [4000], [5000]]


@pytest.mark.parametrize(
    ("failing", "why"),
    [(POISON, "poisoned batch"), (THREAD_EXIT, "sys.exit()")],
    ids=["an error", "a dying thread"],
)
async def test_a_failing_batch_fails_only_its_own_items(
    decoder: ScriptedDecoder, failing: int, why: str
) -> None:
    scheduler = make_scheduler(decoder)
    outcomes: dict[int, object] = {}

    async def run(prompt: int, sampling: SamplingOptions) -> None:
        try:
            outcomes[prompt] = await collect(scheduler, new_item(prompt, 2, sampling))
        except BackendError as exc:
            outcomes[prompt] = str(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run, failing, GREEDY)
        nursery.start_soon(run, 7, GREEDY)  # same batch as the failing one: fails with it
        nursery.start_soon(run, 8, SAMPLED)  # another batch: unharmed
    assert outcomes[failing] == outcomes[7]
    assert str(outcomes[failing]).startswith("generation failed: ")
    assert why in str(outcomes[failing])
    assert outcomes[8] == [8000, 8001]
    # The scheduler keeps serving after a failure, on both workers at once.
    async with trio.open_nursery() as nursery:
        nursery.start_soon(run, 10, GREEDY)
        nursery.start_soon(run, 11, SAMPLED)
    assert outcomes[10] == [10000, 10001] and outcomes[11] == [11000, 11001]
    await scheduler.aclose()


async def test_leaving_early_stops_only_that_item(decoder: ScriptedDecoder) -> None:
    scheduler = make_scheduler(decoder)
    kept: list[int] = []

    async def leave_after_two() -> None:
        async with scheduler.generation(new_item(1, 50)) as stream:
            seen = 0
            async for group in stream:
                seen += len(group)
                if seen >= 2:
                    break

    async def keep() -> None:
        kept.extend(await collect(scheduler, new_item(2, 50)))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(leave_after_two)
        nursery.start_soon(keep)
    await scheduler.aclose()
    assert decoder.batches == [[1, 2]]
    assert kept == [2000 + step for step in range(50)]
    # The decoder stopped offering to the item that left long before the end.
    assert decoder.offers[1] < 50


async def test_a_withdrawn_queued_item_leaves_the_queue(decoder: ScriptedDecoder) -> None:
    scheduler = make_scheduler(decoder, workers=1)
    decoder.gate.clear()
    leave_queue = trio.CancelScope()

    async def queued_then_cancelled() -> None:
        with leave_queue:
            await collect(scheduler, new_item(2, 1))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(collect, scheduler, new_item(1, 1))
        await trio.to_thread.run_sync(decoder.started.acquire)
        nursery.start_soon(queued_then_cancelled)
        await trio.testing.wait_all_tasks_blocked()
        assert scheduler.stats().queued == 1
        leave_queue.cancel()
        await trio.testing.wait_all_tasks_blocked()
        assert scheduler.stats().queued == 0
        decoder.gate.set()
    await scheduler.aclose()
    assert decoder.batches == [[1]]


async def test_aclose_fails_queued_and_running_items_and_waits_for_workers(
    decoder: ScriptedDecoder,
) -> None:
    scheduler = make_scheduler(decoder, workers=1)
    errors: list[str] = []

    async def run(prompt: int) -> None:
        try:
            await collect(scheduler, new_item(prompt, 100_000))
        except BackendError as exc:
            errors.append(str(exc))

    decoder.gate.clear()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(run, 1)
        nursery.start_soon(run, 2)
        await trio.to_thread.run_sync(decoder.started.acquire)
        nursery.start_soon(run, 3)
        await trio.testing.wait_all_tasks_blocked()
        assert scheduler.stats().queued == 1
        # The worker thread is stuck before its first step for a while yet.
        threading.Timer(0.05, decoder.gate.set).start()
        await scheduler.aclose()
        assert decoder.active == 0  # aclose waited for the worker thread
        assert scheduler.stats() == BackendStats(running=0, queued=0, batches=0)
    assert errors == ["the backend is shutting down"] * 3
    with pytest.raises(SchedulerClosedError):
        await collect(scheduler, new_item(4, 1))


async def test_aclose_also_fails_requests_waiting_for_room_in_the_queue(
    decoder: ScriptedDecoder,
) -> None:
    scheduler = make_scheduler(decoder, workers=1, max_batch_size=1, max_queued=1)
    decoder.gate.clear()
    errors: list[str] = []

    async def run(prompt: int) -> None:
        try:
            await collect(scheduler, new_item(prompt, 1))
        except BackendError as exc:
            errors.append(str(exc))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run, 1)
        await trio.to_thread.run_sync(decoder.started.acquire)
        for prompt in (2, 3, 4):
            nursery.start_soon(run, prompt)
        await trio.testing.wait_all_tasks_blocked()
        assert scheduler.stats().queued == 1
        threading.Timer(0.05, decoder.gate.set).start()
        await scheduler.aclose()
    # 1 was decoding and 2 queued: both stopped; 3 and 4 never got into the queue.
    assert sorted(errors) == ["the backend is shut down"] * 2 + ["the backend is shutting down"] * 2


async def test_a_young_batch_is_stopped_and_continues_merged_with_the_newcomers(
    decoder: ScriptedDecoder,
) -> None:
    events: list[BatchStarted] = []
    scheduler = make_scheduler(decoder, workers=1, on_batch=events, costs=ALWAYS_MERGE)
    results: dict[int, list[int]] = {}

    async def run(prompt: int, max_new_tokens: int, first: trio.Event | None = None) -> None:
        tokens: list[int] = []
        async with scheduler.generation(new_item(prompt, max_new_tokens)) as stream:
            async for group in stream:
                tokens.extend(group)
                if first is not None:
                    first.set()
        results[prompt] = tokens

    first_tokens = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(run, 1, 300, first_tokens)
        await first_tokens.wait()  # item 1 is decoding, alone, and has produced tokens
        for prompt in (2, 3):
            nursery.start_soon(run, prompt, 3)
    await scheduler.aclose()
    assert decoder.batches == [[1], [1, 2, 3]]
    assert [(event.size, event.resumed) for event in events] == [(1, 0), (3, 1)]
    assert scheduler.merges == 1
    # Not one token lost or repeated across the two batches.
    assert results == {
        1: [1000 + n for n in range(300)],
        2: [2000, 2001, 2002],
        3: [3000, 3001, 3002],
    }


async def test_a_requeued_item_can_leave_while_it_waits(decoder: ScriptedDecoder) -> None:
    events: list[BatchStarted] = []
    # A long busy window keeps the re-queued item in the queue while the other batch runs.
    scheduler = make_scheduler(decoder, on_batch=events, busy_batch_wait_s=60, costs=ALWAYS_MERGE)
    first = {prompt: trio.Event() for prompt in (1, 9)}
    leave = {prompt: trio.CancelScope() for prompt in (1, 9)}
    seen: dict[int, list[int]] = {1: [], 9: []}
    kept: list[int] = []

    async def run_until_told(prompt: int, sampling: SamplingOptions) -> None:
        with leave[prompt]:
            async with scheduler.generation(new_item(prompt, 10_000, sampling)) as stream:
                async for group in stream:
                    seen[prompt].extend(group)
                    first[prompt].set()

    async def keep() -> None:
        kept.extend(await collect(scheduler, new_item(2, 3)))

    async with trio.open_nursery() as nursery:
        # Together, within the idle window: one worker each (9, another key, stays busy).
        nursery.start_soon(run_until_told, 9, SAMPLED)
        nursery.start_soon(run_until_told, 1, GREEDY)
        await first[9].wait()
        await first[1].wait()
        nursery.start_soon(keep)  # no worker free: item 1's batch is stopped
        # Item 1 back in the queue beside item 2 (the stop lands at the next step).
        while scheduler.stats().queued < 2:  # noqa: ASYNC110 (no event to wait on)
            await trio.sleep(0.001)
        assert scheduler.merges == 1
        leave[1].cancel()
        await trio.testing.wait_all_tasks_blocked()
        assert scheduler.stats().queued == 1
        leave[9].cancel()  # the busy window ends with the last batch: item 2 goes
    await scheduler.aclose()
    assert kept == [2000, 2001, 2002]
    assert seen[1] == [1000 + n for n in range(len(seen[1]))]
    assert decoder.batches[-1] == [2]
    assert [event.resumed for event in events] == [0, 0, 0]
    assert scheduler.stats() == BackendStats(running=0, queued=0, batches=0, merges=1)


async def test_an_extra_lane_serves_newcomers_while_the_workers_are_busy(
    decoder: ScriptedDecoder,
) -> None:
    events: list[BatchStarted] = []
    # One worker, one lane; the waiting request passes the (zero) TTFT target at once.
    scheduler = make_scheduler(
        decoder, workers=1, lanes=1, ttft_target_s=0.0, on_batch=events, costs=NEVER_MERGE
    )
    first = trio.Event()
    got: dict[int, list[int]] = {}

    async def long_one() -> None:
        with trio.CancelScope() as scope:
            leave_long.append(scope)
            async with scheduler.generation(new_item(1, 10_000)) as stream:
                async for _ in stream:
                    first.set()

    async def short_one(prompt: int) -> None:
        got[prompt] = await collect(scheduler, new_item(prompt, 3, SAMPLED))

    leave_long: list[trio.CancelScope] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(long_one)
        await first.wait()
        await short_one(2)  # served while item 1 still holds the only worker
        assert decoder.active >= 1
        assert scheduler.lanes_opened == 1
        await short_one(3)  # the lane is free again: it serves the next newcomer too
        leave_long[0].cancel()
    await scheduler.aclose()
    assert got == {2: [2000, 2001, 2002], 3: [3000, 3001, 3002]}
    assert [event.lane for event in events] == [False, True, True]
    assert scheduler.stats().lanes_opened == 2


async def test_no_request_starves_under_sustained_load(decoder: ScriptedDecoder) -> None:
    """Closed-loop clients of two keys keep both workers busy, merges always pay and a
    lane is there: every request is still served within a bounded number of batches."""
    events: list[BatchStarted] = []
    scheduler = make_scheduler(
        decoder,
        workers=2,
        max_batch_size=6,
        lanes=1,
        ttft_target_s=0.0,
        on_batch=events,
        costs=ALWAYS_MERGE,
    )
    waited_batches: list[int] = []
    next_prompt = iter(range(1, 10_000))

    async def client(sampling: SamplingOptions, length: int, rounds: int) -> None:
        for _ in range(rounds):
            before = len(events)
            item = new_item(next(next_prompt), length, sampling)
            tokens = await collect(scheduler, item)
            assert len(tokens) == length
            waited_batches.append(len(events) - before)

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for index in range(12):
                # Lengths differ: requests end and arrive at all moments.
                nursery.start_soon(client, GREEDY if index % 3 else SAMPLED, 3 + 7 * index % 40, 6)
    await scheduler.aclose()
    assert len(waited_batches) == 12 * 6
    # 12 clients, batches of up to 4: a request waits for at most the batches of the
    # requests ahead of it (3 full batches) plus its own, and each merge restart.
    assert scheduler.merges > 0 and scheduler.lanes_opened > 0  # the load did exercise both
    # Oldest first: while a request waits, each of the 11 other clients' requests can
    # start at most twice (its batch, and once more after a merge restart), however long
    # the load lasts. (Its own batch and its own restart: 2 more.)
    assert max(waited_batches) <= 2 * 12
