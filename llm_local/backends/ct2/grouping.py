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

When every worker is busy, `plan_relief` decides by measured cost (`costs.CostEstimate`)
what to do for the requests that wait; a request would otherwise wait until the first
running batch ends (`expected_wait_s`: its remaining steps times the step cost):

- **Merge**: stop a running batch of the same key that the waiting requests fit into and
  start it again with them (CTranslate2 cannot add a request to a batch already
  decoding). Its items are re-queued in front with their tokens so far appended to their
  prompts, so a restart re-reads every item's prompt and generated tokens (less a
  cached static prefix): ``redo = prefill cost of those tokens``. Each of the batch's
  items is delayed by `redo`; each newcomer waits `redo` instead of the expected wait.
  Merged when the newcomers save more waiting than the batch's items lose:
  ``waiting × (expected_wait − redo) > active × redo``. A batch that has only just
  started re-reads little more than its prompts (the old young-batch merge); one far
  into its tokens re-reads much and is left alone; on a GPU (milliseconds per thousand
  prompt tokens) a restart is almost always worth it. A batch holding an item that was
  re-queued once is never stopped again: every item is stopped at most once, no livelock.
- **Extra lane**: when no merge is worth it, the oldest request's wait (so far plus
  expected) exceeds the TTFT target, and a lane is free (a replica kept beside the
  workers for this), the waiting requests start at once on the lane.
- Otherwise they wait; a quiet server (a free worker) never gets here.

Everything the rule needs comes in as values (costs, queue, running batches, time), so it
is unit-tested without threads or clocks.
"""

from __future__ import annotations

import itertools
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from llm_local.backends.shared.costs import CostEstimate


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
    """What the relief policy needs to know about a batch that is decoding."""

    batch_key: Hashable
    active: int  # items still decoding
    most_generated: int  # the most tokens any active item has produced so far
    stopping: bool  # already told to stop (its items will be re-queued)
    resumed: bool  # holds an item that was re-queued once: never stopped again
    # Restarting from prompt + generated tokens continues exactly as before only without a
    # seed (each batch draws afresh) and without a repetition penalty (CTranslate2 may
    # weigh prompt tokens differently from generated ones).
    restartable: bool = True
    remaining_steps: int = 0  # steps until its longest active item may end
    reread_tokens: int = 0  # tokens its active items would read again if restarted


@dataclass(frozen=True, slots=True)
class Relief:
    """What `plan_relief` decided for the waiting requests."""

    merges: list[int] = field(default_factory=list)  # indices of running batches to stop
    open_lane: bool = False  # start the waiting requests on an extra lane now
    expected_wait_s: float = 0.0  # until a worker frees, had nothing been done
    # When to ask again if nothing changes: the moment the oldest request's wait would
    # pass the TTFT target, while a lane is free. None: no deadline.
    wake_at: float | None = None


def expected_wait_s(running: Sequence[RunningBatch], costs: CostEstimate) -> float:
    """How long until the first running batch ends (0 when one is being stopped)."""
    if not running or any(batch.stopping for batch in running):
        return 0.0
    return min(batch.remaining_steps * costs.step_s(batch.active) for batch in running)


def plan_relief(
    waiting: Sequence[Queued],
    running: Sequence[RunningBatch],
    *,
    free_workers: int,
    free_lanes: int,
    max_batch_size: int,
    costs: CostEstimate,
    ttft_target_s: float,
    now: float,
) -> Relief:
    """What to do for `waiting` (in arrival order) while every worker is busy: which
    running batches to stop and merge, or whether to open an extra lane (see above)."""
    if free_workers > 0 or not waiting:
        return Relief()
    wait = expected_wait_s(running, costs)
    waiting_per_key: dict[Hashable, int] = {}
    for item in waiting:
        waiting_per_key[item.batch_key] = waiting_per_key.get(item.batch_key, 0) + 1
    stopping_keys = {batch.batch_key for batch in running if batch.stopping}
    merges: list[int] = []
    for key, count in waiting_per_key.items():
        if key in stopping_keys:
            continue
        best: tuple[float, int] | None = None
        for index, batch in enumerate(running):
            if not (
                batch.batch_key == key
                and not batch.resumed
                and batch.restartable
                and batch.active > 0
                and batch.active + count <= max_batch_size
            ):
                continue
            redo = costs.prefill_s(batch.reread_tokens)
            gain = count * (wait - redo) - batch.active * redo
            if gain > 0 and (best is None or gain > best[0]):
                best = (gain, index)
        if best is not None:
            merges.append(best[1])
    if merges:
        return Relief(merges=sorted(merges), expected_wait_s=wait)
    if free_lanes <= 0:
        return Relief(expected_wait_s=wait)
    oldest = min(item.arrived_at for item in waiting)
    if now - oldest + wait > ttft_target_s:
        return Relief(open_lane=True, expected_wait_s=wait)
    return Relief(expected_wait_s=wait, wake_at=oldest + ttft_target_s - wait)


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
