"""Tenants take turns: the pure rules behind fair sharing (no I/O, no clock).

A gateway sends every call with ``x-tenant-id``. Served in arrival order, one tenant
that opens a hundred streams makes every other tenant wait behind all of them. Served
in turns, each tenant with work waiting gets the next free place before any tenant gets
a second one, so a lone request waits for at most one place per other busy tenant.

- `TenantQueue` is the admission queue's order: first in, first out within a tenant;
  a tenant served goes to the back of the turn order if it still waits.
- `in_tenant_turns` is the same order for a list that is planned afresh each time (the
  CTranslate2 backend's waiting list): tenants in the order of their first item, one
  item of each in turn.

A request without a tenant id belongs to the anonymous tenant (``None``): they share
one turn, like any other tenant.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Hashable, Iterable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")
Tenant = str | None


class TenantQueue(Generic[T]):
    """A queue that serves tenants in turn and each tenant's items in arrival order."""

    def __init__(self) -> None:
        # Insertion order is the turn order; a tenant is present only while it waits.
        self._queues: dict[Tenant, deque[T]] = {}
        self._length = 0

    def __len__(self) -> int:
        return self._length

    def __bool__(self) -> bool:
        return self._length > 0

    def waiting(self, tenant: Tenant) -> int:
        """How many items of `tenant` are queued."""
        queue = self._queues.get(tenant)
        return 0 if queue is None else len(queue)

    def push(self, tenant: Tenant, item: T) -> None:
        """Queue `item`; a tenant not waiting yet joins at the back of the turns."""
        self._queues.setdefault(tenant, deque()).append(item)
        self._length += 1

    def pop(self) -> T:
        """The oldest item of the tenant whose turn it is; IndexError when empty."""
        if not self._queues:
            raise IndexError("pop from an empty TenantQueue")
        tenant = next(iter(self._queues))
        queue = self._queues.pop(tenant)
        item = queue.popleft()
        if queue:
            self._queues[tenant] = queue  # to the back: every other tenant goes first
        self._length -= 1
        return item

    def remove(self, tenant: Tenant, item: T) -> None:
        """Take `item` out wherever it is (it left the queue); ValueError if absent."""
        queue = self._queues.get(tenant)
        if queue is None:
            raise ValueError("item not queued for this tenant")
        queue.remove(item)
        if not queue:
            # Its turn is lost with its last item: coming back later means the back.
            del self._queues[tenant]
        self._length -= 1


def in_tenant_turns(items: Iterable[T], tenant_of: Callable[[T], Hashable]) -> list[T]:
    """`items` reordered so that tenants take turns, each keeping its own order.

    Tenants come in the order of their first item; the first round takes the first item
    of every tenant, the second round the second, and so on. With one tenant (or none
    known) the order is unchanged.
    """
    per_tenant: dict[Hashable, list[T]] = {}
    for item in items:
        per_tenant.setdefault(tenant_of(item), []).append(item)
    if len(per_tenant) <= 1:
        return [item for group in per_tenant.values() for item in group]
    return list(_rounds(list(per_tenant.values())))


def _rounds(groups: list[list[T]]) -> Iterator[T]:
    depth = max(len(group) for group in groups)
    for index in range(depth):
        for group in groups:
            if index < len(group):
                yield group[index]


class TenantLabels:
    """A bounded set of metric label values for tenant ids.

    The first `limit` distinct tenants seen keep their own label for the life of the
    process; every later one is counted as ``other``. Requests without a tenant id are
    ``none``. A metrics backend thus holds at most `limit` + 2 series per metric, however
    many tenant ids clients invent.
    """

    OTHER = "other"
    NONE = "none"

    def __init__(self, limit: int) -> None:
        if limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        self._limit = limit
        self._known: set[str] = set()

    def label(self, tenant: Tenant) -> str:
        if tenant is None:
            return self.NONE
        if tenant in self._known:
            return tenant
        if len(self._known) < self._limit:
            self._known.add(tenant)
            return tenant
        return self.OTHER
