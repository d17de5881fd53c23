"""The batching scheduler: a bounded queue, a trio task that forms batches, workers.

Generations are submitted to a bounded queue (a full queue makes `submit` wait). One trio
task plans batches with the pure policy in `grouping.py` whenever something changes (an
arrival, a worker freed, a gathering window ran out) and starts each batch on a worker:
a trio task that runs the blocking `execute(batch)` on a thread under a CapacityLimiter
of `workers`. The scheduler knows nothing about CTranslate2: `execute` does the decoding
and feeds tokens to the items (see `decode.py`), so the scheduling logic is testable with
a fake `execute`.

When requests wait and no worker is free, the scheduler asks `grouping.plan_relief`, with
the costs measured so far (`costs.py`), whether to stop a running batch and re-queue its
items in front of the queue so that the next batch holds old and new together (see
`BatchItem.preempt`), or to start the waiting requests on an extra lane: a replica kept
beside the workers, used only when the TTFT target would be missed otherwise. Each
decision is counted (`merges`, `lanes_opened`, `expected_wait_s`) and logged at debug.

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
from llm_local.backends.ct2.grouping import RunningBatch, plan_dispatch, plan_relief
from llm_local.backends.shared.bridge import BatchItem, TokenStream, WakeupRelay
from llm_local.backends.shared.costs import PRIOR, CostEstimate
from llm_local.core.fairness import in_tenant_turns

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
    lane: bool = False  # started on an extra lane (the workers were all busy)


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
        costs: Callable[[], CostEstimate] = lambda: PRIOR,
        ttft_target_s: float = math.inf,
        lanes: int = 0,
        is_cached: Callable[[tuple[int, ...]], bool] = lambda prefix: False,
        maintenance: Callable[[], Callable[[], None] | None] = lambda: None,
    ) -> None:
        """`busy_batch_wait_s`: the gathering window while a batch decodes (None: always
        `batch_wait_s`); `costs`: the measured costs now; `ttft_target_s`: the time to
        first token beyond which waiting requests go to one of `lanes` extra lanes;
        `is_cached`: whether a static prefix is in the decoder's cache (a restart does
        not read it again); `maintenance`: asked whenever no batch runs, returns blocking
        work that needs the decoder idle (dropping its prefix cache), run on a thread
        before the next batch starts."""
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
        self._costs = costs
        self._ttft_target_s = ttft_target_s
        self._lanes = max(lanes, 0)
        self._is_cached = is_cached
        self._maintenance = maintenance
        self._min_split_size = min_split_size
        self._max_prompt_spread = max_prompt_spread
        self._on_batch = on_batch

        self._queue_slots = trio.Semaphore(max_queued)
        self._waiting: list[BatchItem] = []
        self._running: list[list[BatchItem]] = []
        self._stopping: set[int] = set()  # id() of running batches told to stop for a merge
        self.merges = 0  # batches stopped so far to merge them with waiting requests
        self.lanes_opened = 0  # batches started on an extra lane
        self.expected_wait_s = 0.0  # the last planning's wait for a worker (0: none waits)
        self._limiter = trio.CapacityLimiter(workers + self._lanes)
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
            merges=self.merges,
            lanes_opened=self.lanes_opened,
            expected_wait_seconds=self.expected_wait_s if self._waiting else 0.0,
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
            if not self._running and not self._closing:
                work = self._maintenance()
                if work is not None:
                    await trio.to_thread.run_sync(work)
            if not self._closing:
                plan = plan_dispatch(
                    # Tenants take turns at the batch places (core/fairness.py).
                    in_tenant_turns(self._waiting, lambda item: item.tenant_id),
                    free_workers=self._workers - self._running_on_workers(),
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
                wake_at = _earliest(plan.wake_at, self._relieve(workers))
            if wake_at is None:
                await self._changed.wait()
            else:
                with trio.move_on_at(wake_at):
                    await self._changed.wait()

    def _running_on_workers(self) -> int:
        # Replicas are alike: which one a batch runs on does not matter, only how many
        # batches run. The batches beyond `workers` are the lanes, so a lane frees as soon
        # as any batch ends, not only the one started on it.
        return min(len(self._running), self._workers)

    def _relieve(self, workers: trio.Nursery) -> float | None:
        """Merge or open a lane for the waiting requests, as `plan_relief` decides; returns
        when to plan again if nothing changes."""
        if not self._waiting:
            self.expected_wait_s = 0.0
            return None
        running = [self._describe(batch) for batch in self._running]
        costs = self._costs()
        free_lanes = self._lanes - (len(self._running) - self._running_on_workers())
        now = trio.current_time()
        relief = plan_relief(
            self._waiting,
            running,
            free_workers=self._workers - self._running_on_workers(),
            free_lanes=free_lanes,
            max_batch_size=self._max_batch_size,
            costs=costs,
            ttft_target_s=self._ttft_target_s,
            now=now,
        )
        self.expected_wait_s = relief.expected_wait_s
        for index in relief.merges:
            batch = self._running[index]
            self._stopping.add(id(batch))
            for item in batch:
                item.preempt()
            self.merges += 1
            log.debug(
                "stopping a batch of %d to merge it with %d waiting: it would re-read %d"
                " tokens (%.0f ms) against an expected wait of %.0f ms",
                running[index].active,
                len(self._waiting),
                running[index].reread_tokens,
                costs.prefill_s(running[index].reread_tokens) * 1000,
                relief.expected_wait_s * 1000,
            )
        if not relief.open_lane:
            return relief.wake_at
        plan = plan_dispatch(
            self._waiting,
            free_workers=free_lanes,
            max_batch_size=self._max_batch_size,
            wait_s=self._batch_wait_s,
            now=now,
            min_split_size=self._min_split_size,
            max_prompt_spread=self._max_prompt_spread,
            running_batches=len(self._running),
            busy_wait_s=self._busy_batch_wait_s,
        )
        for batch in plan.batches:
            self.lanes_opened += 1
            log.debug(
                "opening an extra lane for %d waiting: expected wait %.0f ms, TTFT target %.0f ms",
                len(batch),
                relief.expected_wait_s * 1000,
                self._ttft_target_s * 1000,
            )
            self._start_batch(workers, batch, lane=True)
        return plan.wake_at

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
            remaining_steps=max(
                (item.max_new_tokens - item.generated for item in active), default=0
            ),
            reread_tokens=sum(self._reread_tokens(item) for item in active),
        )

    def _reread_tokens(self, item: BatchItem) -> int:
        cached = len(item.static_prefix) if self._is_cached(item.static_prefix) else 0
        return item.prompt_length + item.generated - cached

    def _report(self, event: BatchStarted) -> None:
        if self._on_batch is None:
            return
        try:
            self._on_batch(event)
        except Exception:
            # An observer (metrics, tests) must not break the scheduler.
            log.exception("the on_batch observer failed")

    def _start_batch(
        self, workers: trio.Nursery, batch: list[BatchItem], *, lane: bool = False
    ) -> None:
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
                lane=lane,
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


def _earliest(first: float | None, second: float | None) -> float | None:
    if first is None:
        return second
    if second is None:
        return first
    return min(first, second)


def _is_cancellation(exc: BaseException) -> bool:
    if isinstance(exc, BaseExceptionGroup):
        _, rest = exc.split(trio.Cancelled)
        return rest is None
    return isinstance(exc, trio.Cancelled)
