"""Which waiting generations decode together, and when: the batching policy, pure.

No threads, no clock, no trio: the scheduler calls `plan_dispatch` with what is waiting,
how many workers are free and the time, and carries out the plan. The rules:

- Only generations with equal batch keys share a batch: CTranslate2 applies one set of
  sampling options to a whole batch, so mixed options are never batched together.
- At most `max_batch_size` generations per batch.
- Nothing is dispatched while every worker is busy: whatever arrives then waits and joins
  the next batch (CTranslate2 cannot add a request to a batch already decoding).
- With a worker free, a group is dispatched once its oldest member has waited
  `wait_s` (time for company to arrive; 0 = at once) or once it fills a batch. While a
  batch is already decoding the window is `busy_wait_s` instead: under closed-loop load
  the clients of a batch that just ended send their next requests a few milliseconds
  apart, and a request that misses the batch waits a whole batch (seconds) for its
  first token, so a longer window costs little and saves much. Idle, the short window
  keeps a lone request's first token fast.
- Groups are served oldest first. Workers left free once every ready group has one
  split batches, in this order of need:
  1. a batch whose prompt lengths differ by `max_prompt_spread` tokens or more is cut at
     its widest gap in length. CTranslate2 feeds a batch the common prompt length at
     once, then the rest of each longer prompt one decoding step per token (measured:
     a prompt 19 tokens longer than the shortest got its first token 19 steps later),
     so a long prompt batched with short ones waits that many steps for its first token;
  2. a batch of 2 × `min_split_size` or more is halved (shorter prompts in one half),
     because two workers decoding half batches beat one decoding the whole batch
     (FINDINGS: 2 × 16 ≈ 1180 tokens/s against 32 on one worker ≈ 485; on a 2-core
     AVX2 machine, 4 streams: 2 + 2 gave 83 tokens/s, 4 on one worker 55).
  Smaller batches stay whole and leave the worker free for the next arrival.

CTranslate2 cannot add a request to a batch already decoding, but a batch that has only
just started loses little by starting again: `plan_merges` picks, when requests wait and
no worker is free, a young running batch of the same key (no active item has produced
more than `merge_max_generated` tokens) that the waiting requests fit into. The scheduler
stops it and re-queues its items, in front, with their tokens so far appended to their
prompts, so they decode on together with the newcomers. A batch holding an item that was
re-queued once is never stopped again: every item is stopped at most once, no livelock.
"""

from __future__ import annotations

import itertools
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar


class Queued(Protocol):
    """What the policy needs to know about a waiting generation."""

    @property
    def batch_key(self) -> Hashable: ...

    @property
    def arrived_at(self) -> float: ...

    @property
    def prompt_length(self) -> int: ...


QueuedT = TypeVar("QueuedT", bound=Queued)


@dataclass(frozen=True, slots=True)
class DispatchPlan(Generic[QueuedT]):
    batches: list[list[QueuedT]] = field(default_factory=list)
    # When to plan again if nothing arrives and no worker frees up; None = no deadline.
    wake_at: float | None = None


def plan_dispatch(
    waiting: Sequence[QueuedT],
    *,
    free_workers: int,
    max_batch_size: int,
    wait_s: float,
    now: float,
    min_split_size: int,
    max_prompt_spread: int,
    running_batches: int = 0,
    busy_wait_s: float | None = None,
) -> DispatchPlan[QueuedT]:
    """The batches to start now out of `waiting` (given in arrival order).

    `running_batches` batches are decoding already; when there is at least one, the
    gathering window is `busy_wait_s` (None: `wait_s` all the time)."""
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be at least 1, not {max_batch_size}")
    if not waiting or free_workers <= 0:
        return DispatchPlan()

    if running_batches > 0 and busy_wait_s is not None:
        wait_s = busy_wait_s
    ready: list[list[QueuedT]] = []
    wake_at: float | None = None
    for members in _group_by_key(waiting):
        while len(members) >= max_batch_size:
            ready.append(members[:max_batch_size])
            members = members[max_batch_size:]
        if not members:
            continue
        deadline = members[0].arrived_at + wait_s
        if now >= deadline:
            ready.append(members)
        else:
            wake_at = deadline if wake_at is None else min(wake_at, deadline)

    ready.sort(key=lambda batch: batch[0].arrived_at)
    batches = ready[:free_workers]
    for _ in range(free_workers - len(batches)):
        if not _split_one(batches, min_split_size, max_prompt_spread):
            break
    return DispatchPlan(batches=batches, wake_at=wake_at)


@dataclass(frozen=True, slots=True)
class RunningBatch:
    """What the merge policy needs to know about a batch that is decoding."""

    batch_key: Hashable
    active: int  # items still decoding
    most_generated: int  # the most tokens any active item has produced so far
    stopping: bool  # already told to stop (its items will be re-queued)
    resumed: bool  # holds an item that was re-queued once: never stopped again
    # Restarting from prompt + generated tokens continues exactly as before only without a
    # seed (each batch draws afresh) and without a repetition penalty (CTranslate2 may
    # weigh prompt tokens differently from generated ones).
    restartable: bool = True


def plan_merges(
    waiting: Sequence[Queued],
    running: Sequence[RunningBatch],
    *,
    free_workers: int,
    max_batch_size: int,
    merge_max_generated: int,
) -> list[int]:
    """Indices into `running` of the batches to stop so that `waiting` can join them.

    Only when no worker is free (a free worker serves the waiting requests anyway); at
    most one batch per key, and none for a key whose batch is already being stopped (its
    items rejoin the queue and gather the newcomers). Of the candidates, the one with the
    fewest active items is stopped: the least work thrown away. A negative
    `merge_max_generated` turns merging off."""
    if free_workers > 0 or merge_max_generated < 0 or not waiting:
        return []
    waiting_per_key: dict[Hashable, int] = {}
    for item in waiting:
        waiting_per_key[item.batch_key] = waiting_per_key.get(item.batch_key, 0) + 1
    stopping_keys = {batch.batch_key for batch in running if batch.stopping}
    chosen: list[int] = []
    for key, count in waiting_per_key.items():
        if key in stopping_keys:
            continue
        candidates = [
            index
            for index, batch in enumerate(running)
            if batch.batch_key == key
            and not batch.resumed
            and batch.restartable
            and batch.active > 0
            and batch.active + count <= max_batch_size
            and batch.most_generated <= merge_max_generated
        ]
        if candidates:
            chosen.append(min(candidates, key=lambda index: running[index].active))
    return sorted(chosen)


def _group_by_key(waiting: Sequence[QueuedT]) -> list[list[QueuedT]]:
    groups: dict[Hashable, list[QueuedT]] = {}
    for item in waiting:
        groups.setdefault(item.batch_key, []).append(item)
    return list(groups.values())


def _split_one(batches: list[list[QueuedT]], min_split_size: int, max_prompt_spread: int) -> bool:
    """Split the batch that most needs a second worker, in place; False if none does."""
    widest = max(range(len(batches)), key=lambda index: _spread(batches[index]), default=None)
    if widest is not None and _spread(batches[widest]) >= max(max_prompt_spread, 1):
        by_length = sorted(batches[widest], key=lambda item: item.prompt_length)
        gaps = [
            later.prompt_length - earlier.prompt_length
            for earlier, later in itertools.pairwise(by_length)
        ]
        cut = gaps.index(max(gaps)) + 1
        batches[widest : widest + 1] = [by_length[:cut], by_length[cut:]]
        return True
    largest = max(range(len(batches)), key=lambda index: len(batches[index]), default=None)
    if largest is not None and len(batches[largest]) >= 2 * max(min_split_size, 1):
        by_length = sorted(batches[largest], key=lambda item: item.prompt_length)
        middle = (len(by_length) + 1) // 2
        batches[largest : largest + 1] = [by_length[:middle], by_length[middle:]]
        return True
    return False


def _spread(batch: Sequence[Queued]) -> int:
    lengths = [item.prompt_length for item in batch]
    return max(lengths) - min(lengths)
