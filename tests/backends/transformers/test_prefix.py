"""backends/transformers/prefix.py without a model: the page size, the namespaced page
keys, and the budget's eviction order over transformers' own `BlockLedger`.

Reuse on the real model and engine: test_prefix_reuse.py."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from llm_local.backends.transformers.prefix import (
    FLASH_PAGE_TOKENS,
    SMALL_PAGE_TOKENS,
    PrefixReuse,
    hashing_for,
    namespace_digest,
    page_hash,
    resolve_page_tokens,
)

pytest.importorskip("transformers")


def test_auto_pages_are_small_unless_flash_attention_needs_its_own() -> None:
    assert resolve_page_tokens("auto", "sdpa") == SMALL_PAGE_TOKENS == 16
    assert resolve_page_tokens("auto", "eager") == SMALL_PAGE_TOKENS
    assert resolve_page_tokens("auto", "flash_attention_2") == FLASH_PAGE_TOKENS == 256
    assert resolve_page_tokens(64, "flash_attention_2") == 64


def test_a_page_key_depends_on_its_tokens_its_parent_and_the_first_page_s_namespace() -> None:
    tokens = list(range(16))
    plain = page_hash(None, tokens)
    assert page_hash(None, tokens) == plain
    assert page_hash(None, [*tokens[:-1], 99]) != plain
    assert page_hash(plain, tokens) != plain  # a second page with the same ids
    assert plain.bit_length() > 64  # wider than transformers' own 64-bit key
    with hashing_for(namespace_digest("tenant-a")):
        tenant_a = page_hash(None, tokens)
        child_a = page_hash(tenant_a, tokens)
    with hashing_for(namespace_digest("tenant-b")):
        tenant_b = page_hash(None, tokens)
    assert len({plain, tenant_a, tenant_b}) == 3
    assert page_hash(None, tokens) == plain  # the namespace ends with its block
    assert page_hash(tenant_a, tokens) == child_a  # later pages chain from the first


PAGE_BYTES = 1000


@dataclass
class FakeAllocator:
    """The allocator fields prefix.py reads, over transformers' real BlockLedger."""

    ledger: Any
    index: int = 0
    bytes_per_block: int = PAGE_BYTES
    block_table: dict[str, list[int]] = field(default_factory=dict)


class FakePool:
    def __init__(self) -> None:
        self.freed: list[int] = []

    def free_blocks(self, index: int, pages: list[int]) -> None:
        self.freed.extend(pages)


class FakeCache:
    """The engine's cache as prefix.py hooks it: `free_blocks` releases a request's pages
    in its block table's order, a hashed page staying kept (BlockLedger.release)."""

    def __init__(self) -> None:
        from transformers.generation.continuous_batching.cache_allocators.cache_allocator import (
            BlockLedger,
        )

        self.use_prefix_sharing = True
        self.allow_block_sharing = True
        self.cache_allocators = {"full_attention": FakeAllocator(BlockLedger())}
        self.pool = FakePool()

    def add_request(self, request_id: str, pages: list[int]) -> None:
        allocator = self.cache_allocators["full_attention"]
        allocator.block_table[request_id] = list(pages)
        for page in pages:
            allocator.ledger.register_new_hash(page, hash(("page", page)))

    def free_blocks(self, request_id: str, no_cache: bool = False) -> Any:
        allocator = self.cache_allocators["full_attention"]
        for page in allocator.block_table.pop(request_id, []):
            if allocator.ledger.release(page, no_cache):
                self.pool.free_blocks(allocator.index, [page])

    def search_prefix_match(self, request_id: str, prompt_ids: list[int]) -> int:
        return 0

    def mark_complete_blocks(self, state: Any, complete_blocks: dict[str, int]) -> None:
        pass

    def evict_cached_blocks(self) -> bool:
        return False

    def kept(self) -> list[int]:
        return list(self.cache_allocators["full_attention"].ledger.cached_blocks)


def test_the_budget_drops_the_least_recently_released_pages_a_request_s_tail_first() -> None:
    cache = FakeCache()
    reuse = PrefixReuse(budget_bytes=5 * PAGE_BYTES, on_match=lambda *_: None)
    assert reuse.install(cache)
    cache.add_request("old", [1, 2, 3])
    cache.add_request("new", [4, 5, 6])

    cache.free_blocks("old")
    cache.free_blocks("new")  # six pages kept: one over the budget

    assert cache.pool.freed == [3]  # the older request's last page, not its first
    assert cache.kept() == [2, 1, 6, 5, 4]
    assert reuse.counters.kept_pages == 5 and reuse.counters.kept_bytes == 5 * PAGE_BYTES
    assert reuse.counters.evicted_pages == 1
    ledger = cache.cache_allocators["full_attention"].ledger
    assert 3 not in ledger.block_to_hash  # its key is gone: nothing matches a freed page


def test_a_cache_without_the_expected_internals_keeps_sharing_off() -> None:
    cache = FakeCache()
    del cache.cache_allocators["full_attention"].ledger.cached_blocks
    reuse = PrefixReuse(budget_bytes=PAGE_BYTES, on_match=lambda *_: None)

    assert not reuse.install(cache)
    assert cache.use_prefix_sharing is False and cache.allow_block_sharing is False
