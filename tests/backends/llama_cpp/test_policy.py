"""The scheduler's pure rule: what each sequence feeds at the next step, who starts."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llm_local.backends.llama_cpp.policy import BASE, admit, pick_adapter, plan_step


def test_decoding_sequences_each_feed_one_token() -> None:
    assert plan_step([0, 0, 0], prefill_chunk_tokens=64, batch_tokens=512) == [1, 1, 1]


def test_a_newcomer_reads_its_prompt_in_chunks_while_others_decode() -> None:
    # 8 streams decode; a newcomer with 300 prompt tokens reads 64 of them this step.
    assert plan_step([0] * 8 + [300], prefill_chunk_tokens=64, batch_tokens=512) == [1] * 8 + [64]


def test_the_chunk_is_shared_by_newcomers_oldest_first() -> None:
    plan = plan_step([0, 40, 100, 7], prefill_chunk_tokens=64, batch_tokens=512)
    assert plan == [1, 40, 24, 0]


def test_with_nothing_decoding_a_prompt_takes_the_whole_batch() -> None:
    assert plan_step([900], prefill_chunk_tokens=64, batch_tokens=512) == [512]
    assert plan_step([100, 900], prefill_chunk_tokens=64, batch_tokens=512) == [100, 412]


def test_a_short_prompt_is_read_in_one_step() -> None:
    assert plan_step([0, 12], prefill_chunk_tokens=64, batch_tokens=512) == [1, 12]


def test_more_decoding_sequences_than_the_batch_holds_is_a_bug() -> None:
    with pytest.raises(ValueError, match="do not fit"):
        plan_step([0, 0, 0], prefill_chunk_tokens=1, batch_tokens=2)


@given(
    st.lists(st.integers(min_value=0, max_value=2000), max_size=40),
    st.integers(min_value=1, max_value=256),
    st.integers(min_value=40, max_value=1024),
)
def test_every_decoding_sequence_moves_and_the_batch_never_overflows(
    prompt_left: list[int], chunk: int, batch: int
) -> None:
    plan = plan_step(prompt_left, prefill_chunk_tokens=chunk, batch_tokens=batch)
    assert len(plan) == len(prompt_left)
    assert sum(plan) <= batch
    for left, take in zip(prompt_left, plan, strict=True):
        if left == 0:
            assert take == 1
        else:
            assert 0 <= take <= left
    prefill = sum(take for left, take in zip(prompt_left, plan, strict=True) if left)
    if 0 in prompt_left:
        assert prefill <= chunk
    # Nothing left unread while there was room: the prompt tokens fill what is allowed.
    budget = batch - prompt_left.count(0)
    if 0 in prompt_left:
        budget = min(budget, chunk)
    assert prefill == min(budget, sum(prompt_left))


def tenant(item: tuple[str | None, int]) -> str | None:
    return item[0]


def size(item: tuple[str | None, int]) -> int:
    return item[1]


def test_free_sequences_go_to_tenants_in_turn() -> None:
    waiting = [("a", 1), ("a", 2), ("a", 3), ("b", 1), (None, 1)]
    started = admit(waiting, 3, tenant, reserve=size, free_tokens=100)
    assert started == [("a", 1), ("b", 1), (None, 1)]


def test_nothing_starts_without_a_free_sequence() -> None:
    assert admit([("a", 1)], 0, tenant, reserve=size, free_tokens=100) == []
    assert admit([], 4, tenant, reserve=size, free_tokens=100) == []


def test_a_request_starts_only_when_its_tokens_fit_the_kv_cache_left() -> None:
    waiting = [("a", 600), ("b", 300), ("c", 100)]
    # 700 tokens left: a fits, then b does not, and c waits behind b (no overtaking).
    assert admit(waiting, 8, tenant, reserve=size, free_tokens=700) == [("a", 600)]
    assert admit(waiting, 8, tenant, reserve=size, free_tokens=1000) == [
        ("a", 600),
        ("b", 300),
        ("c", 100),
    ]
    assert admit(waiting, 8, tenant, reserve=size, free_tokens=500) == []


# -- one LoRA adapter per step ---------------------------------------------------------------


def test_without_adapters_every_step_is_the_base_models() -> None:
    assert pick_adapter([BASE, BASE], None) == BASE
    assert pick_adapter([BASE, BASE], BASE) == BASE


def test_adapters_take_turns_in_the_order_of_their_oldest_sequence() -> None:
    running = ["b", BASE, "a", "b", BASE]
    steps: list[str] = []
    previous: str | None = None
    for _ in range(6):
        previous = pick_adapter(running, previous)
        steps.append(previous)
    assert steps == ["b", BASE, "a", "b", BASE, "a"]


def test_an_adapter_whose_sequences_ended_hands_the_turn_to_the_oldest() -> None:
    assert pick_adapter(["a", "c"], "b") == "a"


def test_pick_adapter_needs_a_running_sequence() -> None:
    with pytest.raises(ValueError, match="no running sequence"):
        pick_adapter([], None)


@given(st.lists(st.sampled_from([BASE, "a", "b", "c"]), min_size=1, max_size=16))
def test_every_adapter_present_gets_a_step_within_one_round(running: list[str]) -> None:
    present = set(running)
    previous: str | None = None
    seen = []
    for _ in range(len(present)):
        previous = pick_adapter(running, previous)
        seen.append(previous)
    assert set(seen) == present
