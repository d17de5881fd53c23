"""Bounded admission: at most N generations run, at most M wait, nobody waits forever.

A request enters at once while fewer than `max_concurrent` run; otherwise it waits in
FIFO order while fewer than `max_queued` wait; otherwise it is rejected at once. A
waiter that is not admitted within `queue_timeout_s` is rejected too. When a slot is
freed it is handed straight to the oldest waiter, so a newcomer can never overtake
the queue.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from llm_local.core.errors import CapacityExceeded


class _Waiter:
    __slots__ = ("admitted", "event")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.admitted = False


class Admission:
    def __init__(self, max_concurrent: int, max_queued: int, queue_timeout_s: float) -> None:
        if max_concurrent < 1:
            raise ValueError(f"max_concurrent must be at least 1, got {max_concurrent}")
        if max_queued < 0:
            raise ValueError(f"max_queued must be >= 0, got {max_queued}")
        if math.isnan(queue_timeout_s) or queue_timeout_s < 0:
            raise ValueError(f"queue_timeout_s must be >= 0, got {queue_timeout_s}")
        self._max_concurrent = max_concurrent
        self._max_queued = max_queued
        self._queue_timeout_s = queue_timeout_s
        self._running = 0
        self._waiters: deque[_Waiter] = deque()

    @property
    def max_concurrent(self) -> int:
        return self._max_concurrent

    @property
    def max_queued(self) -> int:
        return self._max_queued

    @property
    def running(self) -> int:
        return self._running

    @property
    def queued(self) -> int:
        return len(self._waiters)

    @property
    def full(self) -> bool:
        """A new request would not start right away (it would wait or be rejected)."""
        return self._running >= self._max_concurrent

    @property
    def rejecting(self) -> bool:
        """A new request would be rejected at once: every slot and queue place is taken."""
        return self.full and len(self._waiters) >= self._max_queued

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one generation slot for the body; raises CapacityExceeded."""
        await self._acquire()
        try:
            yield
        finally:
            self._release()

    async def _acquire(self) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._running < self._max_concurrent:
            self._running += 1
            # A scheduling point that cannot raise: the slot is taken and must not leak.
            await trio.lowlevel.cancel_shielded_checkpoint()
            return
        if len(self._waiters) >= self._max_queued:
            raise CapacityExceeded(
                f"server at capacity: {self._running} generations running "
                f"(limit {self._max_concurrent}) and {len(self._waiters)} queued "
                f"(limit {self._max_queued})"
            )
        waiter = _Waiter()
        self._waiters.append(waiter)
        try:
            with trio.move_on_after(self._queue_timeout_s):
                await waiter.event.wait()
        except BaseException:
            # Cancelled while queued: leave the queue, or pass on a slot handed over
            # in the same instant so that it is not lost.
            self._abandon(waiter)
            raise
        if waiter.admitted:
            return
        self._abandon(waiter)
        raise CapacityExceeded(
            f"no generation slot became free within {self._queue_timeout_s:g} s "
            f"({self._running} running, limit {self._max_concurrent})"
        )

    def _abandon(self, waiter: _Waiter) -> None:
        if waiter.admitted:
            self._release()
        else:
            self._waiters.remove(waiter)

    def _release(self) -> None:
        if self._waiters:
            # Hand the slot over: `running` stays the same.
            waiter = self._waiters.popleft()
            waiter.admitted = True
            waiter.event.set()
        else:
            self._running -= 1
