"""The batching scheduler: a bounded queue, a trio task that forms batches, workers.

Generations are submitted to a bounded queue (a full queue makes `submit` wait). One trio
task plans batches with the pure policy in `grouping.py` whenever something changes (an
arrival, a worker freed, a gathering window ran out) and starts each batch on a worker:
a trio task that runs the blocking `execute(batch)` on a thread under a CapacityLimiter
of `workers`. The scheduler knows nothing about CTranslate2: `execute` does the decoding
and feeds tokens to the items (see `decode.py`), so the scheduling logic is testable with
a fake `execute`.

When requests wait, no worker is free and a batch of their key has only just started,
the scheduler stops that batch and re-queues its items in front of the queue (see
`grouping.plan_merges` and `BatchItem.preempt`): the next batch holds old and new together.

When `execute` raises (even a BaseException such as SystemExit: its thread died), every
unfinished item of that batch fails with BackendError and the scheduler keeps going.
`aclose` fails what is queued, stops what is decoding (each item's next callback answers
"stop") and returns once every worker thread is done.

The loop runs as a trio system task started by `start()`: the Backend protocol gives the
backend no nursery of its own, and the system nursery is cancelled (after which this
scheduler stops its batches and waits for them) if the trio run ends without `aclose`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator, Callable, Hashable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass

import trio

from llm_local.backends.base import BackendError, BackendStats
from llm_local.backends.ct2.grouping import RunningBatch, plan_dispatch, plan_merges
from llm_local.backends.ct2.item import BatchItem, TokenStream, WakeupRelay

log = logging.getLogger(__name__)

Execute = Callable[[Sequence[BatchItem]], None]


class SchedulerClosedError(BackendError):
    """The backend is closing or closed: the generation cannot run."""


@dataclass(frozen=True, slots=True)
class BatchStarted:
    """Reported to the `on_batch` observer each time a batch starts decoding."""

    batch_key: Hashable
    item_keys: tuple[Hashable, ...]  # each item's own key: all equal to batch_key
    size: int
    max_new_tokens: int  # the longest any item of the batch asked for
    running_batches: int  # including this one
    resumed: int = 0  # items of it re-queued from a batch stopped to merge with newcomers


class BatchScheduler:
    def __init__(
        self,
        execute: Execute,
        *,
        workers: int,
        max_batch_size: int,
        batch_wait_s: float,
        max_queued: int,
        min_split_size: int = 2,
        max_prompt_spread: int = 32,
        on_batch: Callable[[BatchStarted], None] | None = None,
        busy_batch_wait_s: float | None = None,
        merge_max_generated: int = 4,
    ) -> None:
        """`busy_batch_wait_s`: the gathering window while a batch decodes (None: always
        `batch_wait_s`); `merge_max_generated`: the most tokens an item of a running batch
        may have produced for the batch to be stopped and merged (-1: never merge)."""
        if workers < 1:
            raise ValueError(f"workers must be at least 1, not {workers}")
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, not {max_batch_size}")
        if max_queued < 1:
            raise ValueError(f"max_queued must be at least 1, not {max_queued}")
        if batch_wait_s < 0 or math.isnan(batch_wait_s):
            raise ValueError(f"batch_wait_s must be 0 or more, not {batch_wait_s}")
        if busy_batch_wait_s is not None and not busy_batch_wait_s >= 0:
            raise ValueError(f"busy_batch_wait_s must be 0 or more, not {busy_batch_wait_s}")
        self._execute = execute
        self._workers = workers
        self._max_batch_size = max_batch_size
        self._batch_wait_s = batch_wait_s
        self._busy_batch_wait_s = busy_batch_wait_s
        self._merge_max_generated = merge_max_generated
        self._min_split_size = min_split_size
        self._max_prompt_spread = max_prompt_spread
        self._on_batch = on_batch

        self._queue_slots = trio.Semaphore(max_queued)
        self._waiting: list[BatchItem] = []
        self._running: list[list[BatchItem]] = []
        self._stopping: set[int] = set()  # id() of running batches told to stop for a merge
        self.merges = 0  # batches stopped so far to merge them with waiting requests
        self._limiter = trio.CapacityLimiter(workers)
        self._changed = trio.Event()
        self._closing = False
        self._started = False
        self._loop_done = trio.Event()
        self.relay: WakeupRelay | None = None  # set by start(): items use it to wake trio

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        """Start the planning task; call from inside the trio run that will use it."""
        if self._started:
            raise RuntimeError("the scheduler is already started")
        self._started = True
        self.relay = WakeupRelay(trio.lowlevel.current_trio_token())
        trio.lowlevel.spawn_system_task(self._run, name="ct2-batch-scheduler")

    async def aclose(self) -> None:
        """Fail queued items, stop running ones, and wait until every worker is done."""
        self._fail_everything("the backend is shutting down")
        if self._started:
            # Shielded: the worker threads end within one decoding step, and returning
            # before they do would let a thread outlive the model it decodes with.
            with trio.CancelScope(shield=True):
                await self._loop_done.wait()

    # -- requests -------------------------------------------------------------------------

    async def submit(self, item: BatchItem) -> None:
        """Queue `item`; waits while the queue is full."""
        if self._closing:
            raise SchedulerClosedError("the backend is shut down")
        if not self._started:
            raise RuntimeError("the scheduler is not started")
        await self._queue_slots.acquire()
        if self._closing:
            self._queue_slots.release()
            raise SchedulerClosedError("the backend is shut down")
        self._waiting.append(item)
        self._notify()

    @asynccontextmanager
    async def generation(self, item: BatchItem) -> AsyncIterator[TokenStream]:
        """Submit `item` and yield its token stream; leaving stops or withdraws it."""
        await self.submit(item)
        try:
            yield item.stream()
        finally:
            self.withdraw(item)

    def withdraw(self, item: BatchItem) -> None:
        """The consumer left: drop `item` from the queue, or stop it if it is decoding."""
        item.cancel()
        if item in self._waiting:
            self._waiting.remove(item)
            self._release_slot(item)
            self._notify()

    def stats(self) -> BackendStats:
        return BackendStats(
            running=sum(1 for batch in self._running for item in batch if item.active),
            queued=len(self._waiting),
            batches=len(self._running),
        )

    # -- the planning task ------------------------------------------------------------------

    def _fail_everything(self, reason: str) -> None:
        """Close for good: fail every queued and running item with `reason`."""
        self._closing = True
        for item in self._waiting:
            item.fail(SchedulerClosedError(reason))
            # Wakes one submitter waiting for room; it sees _closing and passes the
            # slot on, so every waiting submitter fails in turn.
            self._release_slot(item)
        self._waiting.clear()
        for batch in self._running:
            for item in batch:
                item.fail(SchedulerClosedError(reason))
        self._notify()

    def _release_slot(self, item: BatchItem) -> None:
        # An item holds a queue slot from `submit` to its first batch; a re-queued item
        # comes back without one (it must not wait for room, nor free someone else's).
        if not item.resumed:
            self._queue_slots.release()

    def _notify(self) -> None:
        self._changed.set()

    async def _run(self) -> None:
        try:
            async with trio.open_nursery() as workers:
                try:
                    await self._plan_forever(workers)
                finally:
                    # Cancelled (the trio run is ending) or crashed: stop every batch so
                    # the nursery's wait for the worker threads is short.
                    self._fail_everything("the scheduler stopped")
        except BaseException as exc:
            if _is_cancellation(exc):
                raise  # the trio run is ending: the expected way out
            # A system task must not raise: that would crash the whole trio run.
            log.exception("the batch scheduler crashed")
        finally:
            self._loop_done.set()

    async def _plan_forever(self, workers: trio.Nursery) -> None:
        while not (self._closing and not self._running):
            self._changed = trio.Event()
            wake_at: float | None = None
            if not self._closing:
                plan = plan_dispatch(
                    self._waiting,
                    free_workers=self._workers - len(self._running),
                    max_batch_size=self._max_batch_size,
                    wait_s=self._batch_wait_s,
                    now=trio.current_time(),
                    min_split_size=self._min_split_size,
                    max_prompt_spread=self._max_prompt_spread,
                    running_batches=len(self._running),
                    busy_wait_s=self._busy_batch_wait_s,
                )
                for batch in plan.batches:
                    self._start_batch(workers, batch)
                wake_at = plan.wake_at
                self._stop_young_batches()
            if wake_at is None:
                await self._changed.wait()
            else:
                with trio.move_on_at(wake_at):
                    await self._changed.wait()

    def _stop_young_batches(self) -> None:
        """Stop the young batches the waiting requests should join (grouping.plan_merges)."""
        if not self._waiting or self._merge_max_generated < 0:
            return
        running = [self._describe(batch) for batch in self._running]
        chosen = plan_merges(
            self._waiting,
            running,
            free_workers=self._workers - len(self._running),
            max_batch_size=self._max_batch_size,
            merge_max_generated=self._merge_max_generated,
        )
        for index in chosen:
            batch = self._running[index]
            self._stopping.add(id(batch))
            for item in batch:
                item.preempt()
            self.merges += 1
            log.debug("stopping a batch of %d to merge it", running[index].active)

    def _describe(self, batch: list[BatchItem]) -> RunningBatch:
        active = [item for item in batch if item.active]
        return RunningBatch(
            batch_key=batch[0].batch_key,
            active=len(active),
            most_generated=max((item.generated for item in active), default=0),
            stopping=id(batch) in self._stopping,
            resumed=any(item.resumed for item in batch),
            restartable=all(
                item.sampling.seed is None and item.sampling.repetition_penalty == 1.0
                for item in batch
            ),
        )

    def _report(self, event: BatchStarted) -> None:
        if self._on_batch is None:
            return
        try:
            self._on_batch(event)
        except Exception:
            # An observer (metrics, tests) must not break the scheduler.
            log.exception("the on_batch observer failed")

    def _start_batch(self, workers: trio.Nursery, batch: list[BatchItem]) -> None:
        for item in batch:
            self._waiting.remove(item)
            self._release_slot(item)
        self._running.append(batch)
        workers.start_soon(self._run_batch, batch)
        self._report(
            BatchStarted(
                batch_key=batch[0].batch_key,
                item_keys=tuple(item.batch_key for item in batch),
                size=len(batch),
                max_new_tokens=max(item.max_new_tokens for item in batch),
                running_batches=len(self._running),
                resumed=sum(1 for item in batch if item.resumed),
            )
        )

    async def _run_batch(self, batch: list[BatchItem]) -> None:
        error: BaseException | None = None
        try:
            # Not abandoned on cancel: the thread must end before the model is released.
            await trio.to_thread.run_sync(self._execute, batch, limiter=self._limiter)
        except Exception as exc:
            log.warning("a batch of %d failed: %s", len(batch), exc)
            error = exc
        except BaseException as exc:
            # Not cancellable (see above), so this came from the thread: it died with
            # SystemExit or the like (a library calling sys.exit, a KeyboardInterrupt
            # raised on it). Re-raised, it would take the whole scheduler down and every
            # later request with it; it fails this batch alone, like any other error.
            if isinstance(exc, trio.Cancelled):
                raise
            log.error("a worker thread died decoding a batch of %d: %r", len(batch), exc)
            error = exc
        finally:
            stopped = id(batch) in self._stopping
            self._stopping.discard(id(batch))
            requeued: list[BatchItem] = []
            for item in batch:
                if stopped and error is None and not self._closing and item.resume_after_preempt():
                    requeued.append(item)
                else:
                    item.batch_ended(error)
            # In front: they arrived first, and their consumers have been waiting longest.
            self._waiting[:0] = requeued
            self._running.remove(batch)
            self._notify()


def _is_cancellation(exc: BaseException) -> bool:
    if isinstance(exc, BaseExceptionGroup):
        _, rest = exc.split(trio.Cancelled)
        return rest is None
    return isinstance(exc, trio.Cancelled)
