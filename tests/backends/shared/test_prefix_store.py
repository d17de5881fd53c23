"""The prefix store: exact matching by namespace, shared-cell accounting, LRU order."""

from __future__ import annotations

import pytest

from llm_local.backends.shared.prefix_store import (
    HostCache,
    Namespace,
    PrefixStore,
    common_prefix,
)

MODEL = Namespace("smollm2")


def finished(
    store: PrefixStore[int], handle: int, tokens: list[int], ns: Namespace = MODEL
) -> None:
    store.open(handle, ns)
    store.append(handle, tokens)
    store.finish(handle)


def test_common_prefix_counts_equal_leading_ids() -> None:
    assert common_prefix([1, 2, 3], [1, 2, 4, 5]) == 2
    assert common_prefix([1, 2], [1, 2, 3]) == 2
    assert common_prefix([], [1]) == 0
    assert common_prefix([9, 2], [1, 2]) == 0


def test_the_longest_exact_prefix_wins_and_the_last_prompt_token_is_left_to_read() -> None:
    store: PrefixStore[int] = PrefixStore()
    finished(store, 0, [1, 2, 3])
    finished(store, 1, [1, 2, 3, 4, 5, 6])
    finished(store, 2, [7, 8, 9])

    match = store.best_match(MODEL, [1, 2, 3, 4, 5, 6, 7])
    assert match is not None and (match.handle, match.length) == (1, 6) and match.whole
    # The whole prompt cached: one token is still read, for the first new token's logits.
    same = store.best_match(MODEL, [1, 2, 3, 4, 5, 6])
    assert same is not None and same.length == 5 and not same.whole
    assert store.best_match(MODEL, [4, 1, 2]) is None


def test_a_position_off_by_one_does_not_match() -> None:
    store: PrefixStore[int] = PrefixStore()
    finished(store, 0, [5, 6, 7])

    assert store.best_match(MODEL, [0, 5, 6, 7, 8]) is None


def test_namespaces_never_share_model_adapter_or_tenant_salt() -> None:
    store: PrefixStore[int] = PrefixStore()
    finished(store, 0, [1, 2, 3, 4], Namespace("smollm2", salt="tenant-a"))
    prompt = [1, 2, 3, 4, 5]

    assert store.best_match(Namespace("smollm2", salt="tenant-b"), prompt) is None
    assert store.best_match(Namespace("smollm2"), prompt) is None
    assert store.best_match(Namespace("smollm2", adapter="x", salt="tenant-a"), prompt) is None
    assert store.best_match(Namespace("other", salt="tenant-a"), prompt) is None
    hit = store.best_match(Namespace("smollm2", salt="tenant-a"), prompt)
    assert hit is not None and hit.length == 4


def test_a_shared_prefix_is_counted_once() -> None:
    store: PrefixStore[int] = PrefixStore()
    finished(store, 0, [1, 2, 3, 4, 5])
    store.copy_prefix(0, 1, 3)  # cells 0..2 now held by both
    store.append(1, [9, 9])

    assert store.cells() == 5 + 2
    # Sequence 1 runs and holds the shared three; only sequence 0's own tail is idle.
    assert store.idle_cells() == 2
    store.finish(1)
    assert store.idle_cells() == 7
    store.drop(0)
    assert store.cells() == 5  # sequence 1 still holds the shared cells
    assert store.counters.reused_tokens == 3


def test_a_cut_tail_frees_its_cells_and_new_tokens_go_to_a_new_block() -> None:
    store: PrefixStore[int] = PrefixStore()
    finished(store, 0, [1, 2, 3, 4])
    store.copy_prefix(0, 1, 4)
    store.finish(1)
    store.take_over(0, 2)  # cells 2, 3 of sequence 0 removed; 1 still holds them
    store.append(0, [8, 8, 8])

    assert list(store.tokens(0)) == [1, 2, 8, 8, 8]
    assert store.cells() == 4 + 3
    assert store.counters.reused_tokens == 4 + 2


def test_running_sequences_are_never_offered_for_eviction_and_lru_is_oldest_first() -> None:
    store: PrefixStore[int] = PrefixStore()
    finished(store, 0, [1])
    finished(store, 1, [2])
    store.open(2, MODEL)
    finished(store, 3, [3])

    assert store.lru_idle() == 0
    assert store.lru_idle(keep=0) == 1
    store.take_over(0, 0)  # running again: not evictable
    assert store.lru_idle() == 1
    store.drop(1, evicted=True)
    store.drop(3, evicted=True)
    assert store.lru_idle() is None
    assert store.counters.evictions == 2


def test_a_used_match_becomes_the_most_recent() -> None:
    store: PrefixStore[int] = PrefixStore()
    finished(store, 0, [1, 2, 3])
    finished(store, 1, [4, 5])
    store.copy_prefix(0, 2, 2)
    store.finish(2)

    assert store.lru_idle() == 1


def test_ties_prefer_an_idle_sequence_used_whole() -> None:
    store: PrefixStore[int] = PrefixStore()
    finished(store, 0, [1, 2, 3])
    finished(store, 1, [1, 2, 3, 4])  # more recent, but would lose its tail
    finished(store, 0 + 5, [1, 2, 3, 7])

    match = store.best_match(MODEL, [1, 2, 3, 9, 9])
    assert match is not None and match.handle == 0 and match.whole


def test_bad_operations_are_refused() -> None:
    store: PrefixStore[int] = PrefixStore()
    finished(store, 0, [1, 2])
    with pytest.raises(ValueError):
        store.open(0, MODEL)
    with pytest.raises(ValueError):
        store.copy_prefix(0, 1, 3)
    with pytest.raises(ValueError):
        store.truncate(0, 5)
    store.take_over(0, 1)
    with pytest.raises(ValueError):
        store.take_over(0, 1)


def test_the_host_cache_matches_exactly_and_drops_the_oldest_first() -> None:
    host: HostCache[bytes] = HostCache()
    first = host.add(MODEL, [1, 2, 3, 4], b"a" * 10, 10)
    host.add(MODEL, [1, 2, 9], b"b" * 5, 5)
    host.add(Namespace("smollm2", salt="x"), [1, 2, 3, 4, 5], b"c", 1)

    assert host.best_match(MODEL, [1, 2, 3, 4, 5]) == (first, 4)
    assert host.best_match(MODEL, [7]) is None
    assert host.bytes == 16
    assert host.evict_lru() and host.bytes == 6 and host.evictions == 1
    assert host.best_match(MODEL, [1, 2, 3, 4, 5]) is not None  # the [1, 2, 9] entry: 2
    key, length = host.best_match(MODEL, [1, 2, 3, 4, 5]) or (0, 0)
    assert length == 2
    tokens, payload = host.take(key)
    assert (tokens, payload, host.bytes) == ((1, 2, 9), b"b" * 5, 1)
    assert host.evict_lru() and not host.evict_lru()


def test_a_peeked_host_entry_stays_for_its_own_call() -> None:
    host: HostCache[bytes] = HostCache()
    key = host.add(MODEL, [1, 2, 3, 4], b"a" * 10, 10)

    assert host.peek(key) == ((1, 2, 3, 4), b"a" * 10)
    assert len(host) == 1 and host.bytes == 10
    assert host.best_match(MODEL, [1, 2, 3, 4, 5]) == (key, 4)
