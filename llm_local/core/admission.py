"""Bounded admission: at most N generations run, at most M wait, nobody waits forever.

A request enters at once while fewer than `max_concurrent` run; otherwise it waits
while fewer than `max_queued` wait; otherwise it is rejected at once. A waiter that is
not admitted within `queue_timeout_s` is rejected too. When a slot is freed it is handed
straight to a waiter, so a newcomer can never overtake the queue.

Tenants (``x-tenant-id``) share fairly: the queue serves them in turn, each tenant's
requests in arrival order (core/fairness.py), so one tenant's hundred waiting requests
delay another tenant's single one by at most one freed slot. With `max_per_tenant` set,
a tenant holding that many requests (running and queued together) is refused at once,
whatever room the server still has.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from llm_local.core.errors import CapacityExceeded
from llm_local.core.fairness import Tenant, TenantQueue


class _Waiter:
    __slots__ = ("admitted", "event", "tenant")

    def __init__(self, tenant: Tenant) -> None:
        self.event = trio.Event()
        self.admitted = False
        self.tenant = tenant


class Admission:
    def __init__(
        self,
        max_concurrent: int,
        max_queued: int,
        queue_timeout_s: float,
        max_per_tenant: int = 0,
    ) -> None:
        if max_concurrent < 1:
            raise ValueError(f"max_concurrent must be at least 1, got {max_concurrent}")
        if max_queued < 0:
            raise ValueError(f"max_queued must be >= 0, got {max_queued}")
        if math.isnan(queue_timeout_s) or queue_timeout_s < 0:
            raise ValueError(f"queue_timeout_s must be >= 0, got {queue_timeout_s}")
        if max_per_tenant < 0:
            raise ValueError(f"max_per_tenant must be >= 0 (0 = no limit), got {max_per_tenant}")
        self._max_concurrent = max_concurrent
        self._max_queued = max_queued
        self._queue_timeout_s = queue_timeout_s
        self._max_per_tenant = max_per_tenant
        self._running = 0
        self._waiters: TenantQueue[_Waiter] = TenantQueue()
        self._held: dict[Tenant, int] = {}  # running + queued per tenant (present if > 0)

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
    def max_per_tenant(self) -> int:
        """Running + queued requests one tenant may hold; 0 = no limit."""
        return self._max_per_tenant

    def held(self, tenant: Tenant) -> int:
        """Requests of `tenant` running or queued now."""
        return self._held.get(tenant, 0)

    @property
    def full(self) -> bool:
        """A new request would not start right away (it would wait or be rejected)."""
        return self._running >= self._max_concurrent

    @property
    def rejecting(self) -> bool:
        """A new request would be rejected at once: every slot and queue place is taken."""
        return self.full and len(self._waiters) >= self._max_queued

    @asynccontextmanager
    async def slot(self, tenant: Tenant = None) -> AsyncIterator[None]:
        """Hold one generation slot for the body; raises CapacityExceeded."""
        await trio.lowlevel.checkpoint_if_cancelled()
        held = self._held.get(tenant, 0)
        if self._max_per_tenant and held >= self._max_per_tenant:
            raise CapacityExceeded(
                f"tenant {tenant!r} at its limit: {held} generations running or queued "
                f"(limit {self._max_per_tenant} per tenant, capacity.max_per_tenant)"
            )
        self._held[tenant] = held + 1
        try:
            await self._acquire(tenant)
            try:
                yield
            finally:
                self._release()
        finally:
            self._forget(tenant)

    def _forget(self, tenant: Tenant) -> None:
        left = self._held[tenant] - 1
        if left:
            self._held[tenant] = left
        else:
            del self._held[tenant]  # the dict never outgrows the tenants holding slots

    async def _acquire(self, tenant: Tenant) -> None:
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
        waiter = _Waiter(tenant)
        self._waiters.push(tenant, waiter)
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
            self._waiters.remove(waiter.tenant, waiter)

    def _release(self) -> None:
        if self._waiters:
            # Hand the slot over (to the tenant whose turn it is): `running` stays the same.
            waiter = self._waiters.pop()
            waiter.admitted = True
            waiter.event.set()
        else:
            self._running -= 1
