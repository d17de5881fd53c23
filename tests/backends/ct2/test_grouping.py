"""The batching policy alone: no model, no threads, no clock."""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

import pytest

from llm_local.backends.ct2.grouping import (
    DispatchPlan,
    Relief,
    RunningBatch,
    expected_wait_s,
    plan_dispatch,
    plan_relief,
)
from llm_local.backends.shared.costs import CostEstimate
from llm_local.core.types import SamplingOptions

GREEDY = SamplingOptions().batch_key()
SAMPLED = SamplingOptions(temperature=0.7, top_p=0.9).batch_key()
SEEDED_1 = SamplingOptions(temperature=0.7, seed=1).batch_key()
SEEDED_2 = SamplingOptions(temperature=0.7, seed=2).batch_key()


@dataclass(frozen=True)
class Waiting:
    name: str
    batch_key: Hashable
    arrived_at: float
    prompt_length: int = 40


def waiting(key: Hashable, count: int, *, at: float = 0.0, prefix: str = "r") -> list[Waiting]:
    return [Waiting(f"{prefix}{index}", key, at) for index in range(count)]


def plan(
    queue: list[Waiting],
    *,
    free_workers: int = 2,
    max_batch_size: int = 32,
    wait_s: float = 0.002,
    now: float = 1.0,
    min_split_size: int = 4,
    max_prompt_spread: int = 32,
) -> DispatchPlan[Waiting]:
    return plan_dispatch(
        queue,
        free_workers=free_workers,
        max_batch_size=max_batch_size,
        wait_s=wait_s,
        now=now,
        min_split_size=min_split_size,
        max_prompt_spread=max_prompt_spread,
    )


def names(result: DispatchPlan[Waiting]) -> list[list[str]]:
    return [[item.name for item in batch] for batch in result.batches]


def test_nothing_waiting_plans_nothing() -> None:
    assert plan([]) == DispatchPlan()


def test_no_free_worker_dispatches_nothing_and_sets_no_deadline() -> None:
    result = plan(waiting(GREEDY, 5), free_workers=0)
    assert result.batches == []
    assert result.wake_at is None


def test_a_lone_request_waits_for_company_until_its_window_ends() -> None:
    queue = [Waiting("a", GREEDY, arrived_at=1.0)]
    early = plan(queue, now=1.001, wait_s=0.002)
    assert early.batches == []
    assert early.wake_at == pytest.approx(1.002)
    assert names(plan(queue, now=1.002, wait_s=0.002)) == [["a"]]


def test_zero_wait_dispatches_at_once() -> None:
    queue = [Waiting("a", GREEDY, arrived_at=1.0)]
    assert names(plan(queue, now=1.0, wait_s=0.0)) == [["a"]]


def test_a_full_batch_goes_without_waiting() -> None:
    queue = waiting(GREEDY, 4, at=1.0)
    result = plan(queue, now=1.0, wait_s=10.0, max_batch_size=4, free_workers=1)
    assert names(result) == [["r0", "r1", "r2", "r3"]]


def test_mixed_sampling_options_are_never_batched_together() -> None:
    queue = [
        Waiting("g1", GREEDY, 0.0),
        Waiting("s1", SAMPLED, 0.0),
        Waiting("g2", GREEDY, 0.0),
        Waiting("s2", SAMPLED, 0.0),
    ]
    result = plan(queue, free_workers=2)
    assert names(result) == [["g1", "g2"], ["s1", "s2"]]


def test_different_seeds_are_different_batches() -> None:
    queue = [Waiting("a", SEEDED_1, 0.0), Waiting("b", SEEDED_2, 0.0)]
    assert names(plan(queue, free_workers=2)) == [["a"], ["b"]]


def test_greedy_requests_share_a_batch_whatever_their_temperature_or_seed() -> None:
    keys = [
        SamplingOptions().batch_key(),
        SamplingOptions(temperature=0.0, top_p=0.5, seed=3).batch_key(),
        SamplingOptions(temperature=0.9, top_k=1).batch_key(),
    ]
    queue = [Waiting(f"g{index}", key, 0.0) for index, key in enumerate(keys)]
    assert names(plan(queue, free_workers=1)) == [["g0", "g1", "g2"]]


def test_batches_never_exceed_max_batch_size() -> None:
    result = plan(waiting(GREEDY, 10), free_workers=4, max_batch_size=3, min_split_size=100)
    assert [len(batch) for batch in result.batches] == [3, 3, 3, 1]


def test_more_batches_than_workers_leaves_the_rest_waiting() -> None:
    result = plan(waiting(GREEDY, 10), free_workers=2, max_batch_size=3)
    assert names(result) == [["r0", "r1", "r2"], ["r3", "r4", "r5"]]


def test_oldest_group_is_served_first_when_workers_are_scarce() -> None:
    queue = [
        Waiting("s-old", SAMPLED, 0.1),
        Waiting("g-new", GREEDY, 0.5),
        Waiting("s-newer", SAMPLED, 0.6),
    ]
    assert names(plan(queue, free_workers=1)) == [["s-old", "s-newer"]]


def test_idle_workers_split_a_large_batch_in_halves() -> None:
    result = plan(waiting(GREEDY, 16), free_workers=2, min_split_size=4)
    assert [len(batch) for batch in result.batches] == [8, 8]
    # Arrival order survives the split.
    assert [item.name for batch in result.batches for item in batch] == [
        f"r{index}" for index in range(16)
    ]


def test_a_small_batch_stays_whole_and_keeps_a_worker_free() -> None:
    result = plan(waiting(GREEDY, 7), free_workers=2, min_split_size=4)
    assert [len(batch) for batch in result.batches] == [7]


def test_splitting_uses_only_workers_left_after_every_ready_group() -> None:
    queue = waiting(GREEDY, 16) + waiting(SAMPLED, 2, prefix="s")
    result = plan(queue, free_workers=2, min_split_size=4)
    assert [len(batch) for batch in result.batches] == [16, 2]


def test_a_group_still_gathering_does_not_block_a_ready_one() -> None:
    queue = [Waiting("old", GREEDY, 0.0), Waiting("fresh", SAMPLED, 0.9995)]
    result = plan(queue, now=1.0, wait_s=0.002, free_workers=2)
    assert names(result) == [["old"]]
    assert result.wake_at == pytest.approx(1.0015)


def by_length(*lengths: int) -> list[Waiting]:
    return [Waiting(f"len{length}", GREEDY, 0.0, prompt_length=length) for length in lengths]


def test_an_idle_worker_takes_the_long_prompts_of_a_wide_batch() -> None:
    result = plan(by_length(85, 10, 80, 12), free_workers=2, max_prompt_spread=32)
    assert names(result) == [["len10", "len12"], ["len80", "len85"]]


def test_a_wide_batch_is_cut_at_its_widest_gap() -> None:
    result = plan(by_length(10, 50, 60, 300), free_workers=2, max_prompt_spread=32)
    assert names(result) == [["len10", "len50", "len60"], ["len300"]]


def test_a_narrow_small_batch_stays_whole() -> None:
    result = plan(by_length(10, 20, 41), free_workers=2, max_prompt_spread=32)
    assert names(result) == [["len10", "len20", "len41"]]


def test_a_wide_batch_stays_whole_without_an_idle_worker() -> None:
    result = plan(by_length(10, 300), free_workers=1, max_prompt_spread=32)
    assert names(result) == [["len10", "len300"]]


def test_halves_of_a_large_batch_group_similar_prompt_lengths() -> None:
    lengths = [40, 44, 41, 45, 42, 46, 43, 47]
    result = plan(by_length(*lengths), free_workers=2, min_split_size=4)
    assert names(result) == [
        ["len40", "len41", "len42", "len43"],
        ["len44", "len45", "len46", "len47"],
    ]


def test_a_wide_batch_is_split_before_a_merely_large_one() -> None:
    queue = by_length(10, 200) + waiting(SAMPLED, 16)
    result = plan(queue, free_workers=3, min_split_size=4, max_prompt_spread=32)
    assert sorted(len(batch) for batch in result.batches) == [1, 1, 16]


def test_invalid_batch_size_is_refused() -> None:
    with pytest.raises(ValueError, match="max_batch_size"):
        plan(waiting(GREEDY, 1), max_batch_size=0)


# -- the busy window -------------------------------------------------------------------


def test_while_a_batch_runs_a_free_worker_waits_the_longer_busy_window() -> None:
    queue = [Waiting("a", GREEDY, arrived_at=1.0)]

    def busy(now: float, running: int) -> DispatchPlan[Waiting]:
        return plan_dispatch(
            queue,
            free_workers=1,
            max_batch_size=8,
            wait_s=0.002,
            now=now,
            min_split_size=4,
            max_prompt_spread=32,
            running_batches=running,
            busy_wait_s=0.030,
        )

    assert names(busy(1.002, running=0)) == [["a"]]  # idle: the short window
    waiting_plan = busy(1.002, running=1)
    assert waiting_plan.batches == []
    assert waiting_plan.wake_at == pytest.approx(1.030)
    assert names(busy(1.030, running=1)) == [["a"]]


def test_a_full_batch_does_not_wait_for_the_busy_window() -> None:
    result = plan_dispatch(
        waiting(GREEDY, 4, at=1.0),
        free_workers=1,
        max_batch_size=4,
        wait_s=0.002,
        now=1.0,
        min_split_size=4,
        max_prompt_spread=32,
        running_batches=1,
        busy_wait_s=0.030,
    )
    assert [len(batch) for batch in result.batches] == [4]


# -- relief when every worker is busy: merge, extra lane or wait -----------------------

# A CPU-like machine: 30 ms a step whatever the batch, 3 ms a prompt token.
CPU = CostEstimate(step_base_s=0.03, step_per_item_s=0.0, prefill_token_s=0.003)
# A GPU-like one: prompt tokens cost next to nothing.
GPU = CostEstimate(step_base_s=0.01, step_per_item_s=0.0, prefill_token_s=0.00001)


def running(
    key: Hashable = GREEDY,
    *,
    active: int = 2,
    stopping: bool = False,
    resumed: bool = False,
    restartable: bool = True,
    remaining_steps: int = 100,
    reread_tokens: int = 80,
) -> RunningBatch:
    return RunningBatch(
        key,
        active,
        most_generated=1,
        stopping=stopping,
        resumed=resumed,
        restartable=restartable,
        remaining_steps=remaining_steps,
        reread_tokens=reread_tokens,
    )


def relief(
    queue: list[Waiting],
    batches: list[RunningBatch],
    *,
    free_workers: int = 0,
    free_lanes: int = 0,
    max_batch_size: int = 8,
    costs: CostEstimate = CPU,
    ttft_target_s: float = 1.0,
    now: float = 0.0,
) -> Relief:
    return plan_relief(
        queue,
        batches,
        free_workers=free_workers,
        free_lanes=free_lanes,
        max_batch_size=max_batch_size,
        costs=costs,
        ttft_target_s=ttft_target_s,
        now=now,
    )


def merges(queue: list[Waiting], batches: list[RunningBatch], **options: Any) -> list[int]:
    return relief(queue, batches, **options).merges


def test_the_expected_wait_is_until_the_first_batch_ends() -> None:
    batches = [running(remaining_steps=100), running(remaining_steps=20)]
    assert expected_wait_s(batches, CPU) == pytest.approx(20 * 0.03)
    # A batch being stopped frees its worker within a step.
    assert expected_wait_s([*batches, running(stopping=True)], CPU) == 0.0
    assert expected_wait_s([], CPU) == 0.0


def test_a_young_batch_is_restarted_for_newcomers_that_would_wait_long() -> None:
    # Re-reading 80 tokens costs 0.24 s for each of 2 items; 2 newcomers save 3 s each.
    assert merges(waiting(GREEDY, 2), [running(reread_tokens=80, remaining_steps=100)]) == [0]


def test_a_batch_far_into_its_tokens_is_left_alone_on_a_cpu_but_not_on_a_gpu() -> None:
    # 400 tokens to re-read (1.2 s on the CPU) against a wait of 10 steps (0.3 s).
    old = running(reread_tokens=400, remaining_steps=10)
    assert merges(waiting(GREEDY, 2), [old]) == []
    # The same restart costs 4 ms where prompt tokens are cheap: worth it.
    assert merges(waiting(GREEDY, 2), [old], costs=GPU) == [0]


def test_the_restart_must_save_the_newcomers_more_than_it_costs_the_batch() -> None:
    # redo = 100 tokens = 0.3 s; wait = 20 steps = 0.6 s. One newcomer saves 0.3 s,
    # the batch's items lose 0.3 s each: with 1 item a gain only past the break-even.
    assert merges(
        waiting(GREEDY, 1), [running(active=1, reread_tokens=90, remaining_steps=20)]
    ) == [0]
    assert (
        merges(waiting(GREEDY, 1), [running(active=1, reread_tokens=100, remaining_steps=20)]) == []
    )
    assert (
        merges(waiting(GREEDY, 1), [running(active=4, reread_tokens=100, remaining_steps=20)]) == []
    )


def test_the_most_profitable_batch_of_the_key_is_restarted() -> None:
    batches = [
        running(active=3, reread_tokens=300),
        running(SAMPLED, active=1, reread_tokens=10),
        running(active=2, reread_tokens=100),
    ]
    assert merges(waiting(GREEDY, 2), batches) == [2]


def test_no_relief_while_a_worker_is_free_or_nothing_waits() -> None:
    assert relief(waiting(GREEDY, 2), [running()], free_workers=1, free_lanes=1) == Relief()
    assert relief([], [running()], free_lanes=1) == Relief()


def test_no_merge_the_newcomers_would_overflow() -> None:
    assert merges(waiting(GREEDY, 7), [running(active=2)], max_batch_size=8) == []
    assert merges(waiting(GREEDY, 6), [running(active=2)], max_batch_size=8) == [0]


def test_no_merge_across_keys_or_twice() -> None:
    assert merges(waiting(SAMPLED, 1), [running(GREEDY)]) == []
    # A batch holding a re-queued item is never stopped again: no livelock.
    assert merges(waiting(GREEDY, 1), [running(resumed=True)]) == []
    # A key whose batch is stopping already waits for it instead of stopping another.
    assert merges(waiting(GREEDY, 1), [running(stopping=True), running()]) == []
    # Each key stops its own batch.
    batches = [running(GREEDY), running(SAMPLED)]
    assert merges([*waiting(SAMPLED, 1), *waiting(GREEDY, 1)], batches) == [0, 1]


def test_a_seeded_or_penalised_batch_is_never_restarted() -> None:
    # Restarting would draw a fresh seed or re-weigh the repetition penalty: the answer
    # would no longer be the one the request asked for.
    assert merges(waiting(GREEDY, 1), [running(restartable=False)]) == []


def test_an_extra_lane_opens_once_the_wait_would_pass_the_ttft_target() -> None:
    # Another key: no merge possible. The batch ends in 50 steps = 1.5 s > 1 s target.
    busy = [running(SAMPLED, remaining_steps=50)]
    decided = relief(waiting(GREEDY, 1), busy, free_lanes=1)
    assert decided.open_lane
    assert decided.expected_wait_s == pytest.approx(1.5)
    # No lane left: the requests wait.
    assert not relief(waiting(GREEDY, 1), busy, free_lanes=0).open_lane


def test_below_the_target_the_requests_wait_and_the_planner_looks_again_in_time() -> None:
    # The batch ends in 20 steps = 0.6 s: under the 1 s target for a request just arrived.
    busy = [running(SAMPLED, remaining_steps=20)]
    decided = relief(waiting(GREEDY, 1, at=0.0), busy, free_lanes=1, now=0.1)
    assert not decided.open_lane
    assert decided.wake_at == pytest.approx(1.0 - 0.6)
    # Having waited 0.5 s already, 0.6 s more passes the target.
    assert relief(waiting(GREEDY, 1, at=0.0), busy, free_lanes=1, now=0.5).open_lane


def test_a_merge_is_preferred_to_a_lane() -> None:
    decided = relief(waiting(GREEDY, 2), [running(remaining_steps=100)], free_lanes=1)
    assert decided.merges == [0]
    assert not decided.open_lane
