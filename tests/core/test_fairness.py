"""Tenants take turns: the queue, the reordering of a waiting list, the bounded labels."""

from __future__ import annotations

import pytest

from llm_local.core.fairness import TenantLabels, TenantQueue, in_tenant_turns


def drain(queue: TenantQueue[str]) -> list[str]:
    return [queue.pop() for _ in range(len(queue))]


def test_one_tenant_is_served_in_arrival_order() -> None:
    queue: TenantQueue[str] = TenantQueue()
    for name in ("a1", "a2", "a3"):
        queue.push("a", name)
    assert drain(queue) == ["a1", "a2", "a3"]


def test_a_flooding_tenant_lets_a_later_lone_request_through_next() -> None:
    queue: TenantQueue[str] = TenantQueue()
    for number in range(100):
        queue.push("flood", f"f{number}")
    queue.push("lone", "l0")
    assert [queue.pop() for _ in range(3)] == ["f0", "l0", "f1"]
    assert len(queue) == 98
    assert queue.waiting("lone") == 0


def test_tenants_take_turns_in_the_order_they_started_waiting() -> None:
    queue: TenantQueue[str] = TenantQueue()
    for tenant, item in (("a", "a1"), ("a", "a2"), ("b", "b1"), (None, "n1"), ("b", "b2")):
        queue.push(tenant, item)
    assert drain(queue) == ["a1", "b1", "n1", "a2", "b2"]


def test_a_tenant_that_leaves_the_queue_loses_its_turn() -> None:
    queue: TenantQueue[str] = TenantQueue()
    queue.push("a", "a1")
    queue.push("b", "b1")
    queue.remove("a", "a1")
    queue.push("a", "a2")  # back again: behind b now
    assert drain(queue) == ["b1", "a2"]
    with pytest.raises(IndexError):
        queue.pop()
    with pytest.raises(ValueError):
        queue.remove("a", "a2")


def test_in_tenant_turns_interleaves_and_keeps_each_tenants_order() -> None:
    items = ["a1", "a2", "a3", "a4", "b1", "c1", "b2"]
    expected = ["a1", "b1", "c1", "a2", "b2", "a3", "a4"]
    assert in_tenant_turns(items, lambda item: item[0]) == expected


def test_in_tenant_turns_leaves_one_tenant_alone() -> None:
    items = ["x3", "x1", "x2"]
    assert in_tenant_turns(items, lambda item: None) == items
    assert in_tenant_turns([], lambda item: None) == []


def test_tenant_labels_are_bounded() -> None:
    labels = TenantLabels(limit=2)
    assert [labels.label(t) for t in ("a", "b", "c", "a", None, "d", "b")] == [
        "a",
        "b",
        "other",
        "a",
        "none",
        "other",
        "b",
    ]
    assert TenantLabels(limit=0).label("a") == "other"
    with pytest.raises(ValueError):
        TenantLabels(limit=-1)
