from __future__ import annotations

import pytest
import trio
import trio.lowlevel
import trio.testing

from llm_local.core.admission import Admission
from llm_local.core.errors import CapacityExceeded


async def test_enters_at_once_while_slots_are_free() -> None:
    admission = Admission(max_concurrent=2, max_queued=0, queue_timeout_s=1.0)
    async with admission.slot():
        assert (admission.running, admission.full) == (1, False)
        async with admission.slot():
            assert (admission.running, admission.full) == (2, True)
    assert (admission.running, admission.queued, admission.full) == (0, 0, False)


async def test_rejects_at_once_when_running_and_queue_are_full() -> None:
    admission = Admission(max_concurrent=1, max_queued=1, queue_timeout_s=60.0)
    release = trio.Event()

    async def hold() -> None:
        async with admission.slot():
            await release.wait()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(hold)
        nursery.start_soon(hold)  # queued
        await trio.testing.wait_all_tasks_blocked()
        assert (admission.running, admission.queued, admission.rejecting) == (1, 1, True)
        with pytest.raises(CapacityExceeded) as caught, trio.fail_after(1):
            async with admission.slot():
                pytest.fail("admitted beyond capacity")
        assert "1 generations running (limit 1)" in str(caught.value)
        assert "1 queued (limit 1)" in str(caught.value)
        release.set()
    assert (admission.running, admission.queued) == (0, 0)


async def test_waiters_are_admitted_in_arrival_order() -> None:
    admission = Admission(max_concurrent=1, max_queued=5, queue_timeout_s=60.0)
    order: list[int] = []
    first_may_leave = trio.Event()

    async def first() -> None:
        async with admission.slot():
            await first_may_leave.wait()

    async def waiter(number: int) -> None:
        async with admission.slot():
            order.append(number)
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(first)
        await trio.testing.wait_all_tasks_blocked()
        for number in range(4):
            nursery.start_soon(waiter, number)
            await trio.testing.wait_all_tasks_blocked()
        assert admission.queued == 4
        first_may_leave.set()
    assert order == [0, 1, 2, 3]
    assert (admission.running, admission.queued) == (0, 0)


async def test_a_freed_slot_goes_to_the_queue_not_to_a_newcomer() -> None:
    admission = Admission(max_concurrent=1, max_queued=2, queue_timeout_s=60.0)
    admitted: list[str] = []

    async def enter(name: str) -> None:
        async with admission.slot():
            admitted.append(name)

    async with trio.open_nursery() as nursery:
        async with admission.slot():
            nursery.start_soon(enter, "queued")
            await trio.testing.wait_all_tasks_blocked()
        # The slot was handed to "queued", which has not run yet: a newcomer arriving
        # now must wait behind it.
        assert (admission.running, admission.queued) == (1, 0)
        nursery.start_soon(enter, "newcomer")
    assert admitted == ["queued", "newcomer"]


async def test_waiting_longer_than_the_timeout_is_rejected(
    autojump_clock: trio.testing.MockClock,
) -> None:
    admission = Admission(max_concurrent=1, max_queued=4, queue_timeout_s=5.0)
    async with admission.slot():
        started = trio.current_time()
        with pytest.raises(CapacityExceeded, match=r"within 5 s"):
            async with admission.slot():
                pytest.fail("admitted while the only slot was held")
        assert trio.current_time() - started == pytest.approx(5.0)
        assert admission.queued == 0
    assert admission.running == 0


async def test_cancelled_waiter_leaves_the_queue_and_loses_no_slot() -> None:
    admission = Admission(max_concurrent=1, max_queued=4, queue_timeout_s=60.0)
    release = trio.Event()
    later_admitted = trio.Event()

    async def holder() -> None:
        async with admission.slot():
            await release.wait()

    async def cancelled_waiter(scope_box: list[trio.CancelScope]) -> None:
        with trio.CancelScope() as scope:
            scope_box.append(scope)
            async with admission.slot():
                pytest.fail("a cancelled waiter was admitted")

    async def later() -> None:
        async with admission.slot():
            later_admitted.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(holder)
        await trio.testing.wait_all_tasks_blocked()
        scopes: list[trio.CancelScope] = []
        nursery.start_soon(cancelled_waiter, scopes)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(later)
        await trio.testing.wait_all_tasks_blocked()
        assert admission.queued == 2
        scopes[0].cancel()
        await trio.testing.wait_all_tasks_blocked()
        assert admission.queued == 1
        release.set()
        with trio.fail_after(1):
            await later_admitted.wait()
    assert (admission.running, admission.queued) == (0, 0)


async def test_waiter_cancelled_as_the_slot_is_handed_over_passes_it_on() -> None:
    admission = Admission(max_concurrent=1, max_queued=4, queue_timeout_s=60.0)
    victim_scope = trio.CancelScope()
    second_admitted = trio.Event()

    async def victim() -> None:
        with victim_scope:
            async with admission.slot():
                await trio.sleep_forever()

    async def second() -> None:
        async with admission.slot():
            second_admitted.set()

    async with trio.open_nursery() as nursery:
        async with admission.slot():
            nursery.start_soon(victim)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(second)
            await trio.testing.wait_all_tasks_blocked()
            assert admission.queued == 2
        # No checkpoint between the hand-over to `victim` and its cancellation.
        victim_scope.cancel()
        with trio.fail_after(1):
            await second_admitted.wait()
    assert (admission.running, admission.queued) == (0, 0)


async def test_an_error_in_the_body_frees_the_slot() -> None:
    admission = Admission(max_concurrent=1, max_queued=0, queue_timeout_s=1.0)
    with pytest.raises(ZeroDivisionError):
        async with admission.slot():
            1 / 0  # noqa: B018
    assert admission.running == 0


def test_limits_must_make_sense() -> None:
    with pytest.raises(ValueError, match="max_concurrent"):
        Admission(max_concurrent=0, max_queued=1, queue_timeout_s=1.0)
    with pytest.raises(ValueError, match="max_queued"):
        Admission(max_concurrent=1, max_queued=-1, queue_timeout_s=1.0)


async def test_a_flooding_tenant_does_not_hold_back_another_tenants_request() -> None:
    admission = Admission(max_concurrent=1, max_queued=20, queue_timeout_s=60.0)
    order: list[str] = []
    holder_may_leave = trio.Event()

    async def holder() -> None:
        async with admission.slot("flood"):
            await holder_may_leave.wait()

    async def request(tenant: str, name: str) -> None:
        async with admission.slot(tenant):
            order.append(name)
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(holder)
        await trio.testing.wait_all_tasks_blocked()
        for number in range(10):
            nursery.start_soon(request, "flood", f"flood-{number}")
            await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(request, "lone", "lone")
        await trio.testing.wait_all_tasks_blocked()
        assert admission.queued == 11
        holder_may_leave.set()
    # The lone tenant waited for one freed slot, not for ten.
    assert order[:3] == ["flood-0", "lone", "flood-1"]
    assert len(order) == 11


async def test_a_tenant_at_its_limit_is_refused_while_others_still_enter() -> None:
    admission = Admission(max_concurrent=2, max_queued=4, queue_timeout_s=60.0, max_per_tenant=2)
    release = trio.Event()

    async def hold(tenant: str) -> None:
        async with admission.slot(tenant):
            await release.wait()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(hold, "greedy")
        nursery.start_soon(hold, "greedy")
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(CapacityExceeded) as caught, trio.fail_after(1):
            async with admission.slot("greedy"):
                pytest.fail("admitted beyond the tenant's limit")
        assert "tenant 'greedy' at its limit" in str(caught.value)
        assert "limit 2 per tenant" in str(caught.value)
        nursery.start_soon(hold, "modest")  # queued: the server itself has room left
        await trio.testing.wait_all_tasks_blocked()
        assert (admission.held("greedy"), admission.held("modest"), admission.queued) == (2, 1, 1)
        release.set()
    assert (admission.held("greedy"), admission.held("modest")) == (0, 0)
    assert (admission.running, admission.queued) == (0, 0)


async def test_queued_requests_count_towards_the_tenant_limit() -> None:
    admission = Admission(max_concurrent=1, max_queued=4, queue_timeout_s=60.0, max_per_tenant=2)
    release = trio.Event()

    async def hold() -> None:
        async with admission.slot("t"):
            await release.wait()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(hold)
        nursery.start_soon(hold)  # queued
        await trio.testing.wait_all_tasks_blocked()
        assert (admission.running, admission.queued) == (1, 1)
        with pytest.raises(CapacityExceeded, match="tenant 't' at its limit"):
            async with admission.slot("t"):
                pytest.fail("admitted beyond the tenant's limit")
        release.set()
    # A refused or finished request leaves nothing behind: the tenant may come back.
    async with admission.slot("t"):
        assert admission.held("t") == 1


def test_the_tenant_limit_must_not_be_negative() -> None:
    with pytest.raises(ValueError, match="max_per_tenant"):
        Admission(max_concurrent=1, max_queued=0, queue_timeout_s=1.0, max_per_tenant=-1)
