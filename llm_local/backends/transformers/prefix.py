"""Conversation prefix reuse on transformers' paged KV cache (its block sharing), bounded,
exact and namespaced.

What transformers' continuous batching does by itself (5.x, `allow_block_sharing`):
every page a forward pass fills is given a content hash chained from the first page
(prompt and generated tokens alike); a finished request's hashed pages are not freed but
kept unreferenced, and a new prompt's leading whole pages are looked up by hash and
shared instead of read (at most all pages but the one holding its last token). Only whole
pages are shared; the engine drops kept pages only when the pool runs short, and then all
of them at once. Measured on a 12-turn call (docs/FINDINGS.md): with its 256-token pages a
turn reused 256, 512 or 768 tokens of a 277-867-token history, 0 on the first turn.

What `PrefixReuse` adds, installed on the engine's cache on its generation thread:
- a budget: past `prefix_cache_mb`, the least recently released kept pages go first, a
  request's last pages before its first (a page is useless once one before it is gone);
- exactness and isolation: pages are keyed by a 256-bit BLAKE2b chain of their token ids
  (the engine's own key is 64 bits), started from the request's namespace (its tenant
  under `prefix_isolation = "tenant"`), so a page matches only the same ids at the same
  positions within the same namespace;
- reporting: each request's reused prompt tokens (OpenAI `cached_tokens`) and counters.

The hooks reach into transformers' cache internals (`PagedAttentionCache`, its allocators'
`BlockLedger`); `install` checks that they are there and otherwise leaves page sharing off
(every prompt read whole: slower, never wrong).
"""

from __future__ import annotations

import hashlib
import logging
import threading
from array import array
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("llm_local.backends.transformers")

FLASH_PAGE_TOKENS = 256  # flash-attn's paged decode kernel wants pages of 256 tokens
SMALL_PAGE_TOKENS = 16  # elsewhere: a call's next turn re-reads at most 15 history tokens
_DIGEST_BYTES = 32
_NO_NAMESPACE = bytes(_DIGEST_BYTES)

# The namespace of the request whose pages the generation thread is hashing now: the
# engine calls its module-level hash function without saying for which request.
_current = threading.local()


def resolve_page_tokens(page_tokens: int | str, attn_implementation: str) -> int:
    """The page size for the settings' value ("auto" or a number of tokens)."""
    if page_tokens != "auto":
        return int(page_tokens)
    return FLASH_PAGE_TOKENS if attn_implementation.startswith("flash") else SMALL_PAGE_TOKENS


def namespace_digest(namespace: str | None) -> bytes:
    """What a request's first page hash starts from: its namespace's own digest."""
    if namespace is None:
        return _NO_NAMESPACE
    return hashlib.blake2b(namespace.encode(), digest_size=_DIGEST_BYTES).digest()


def page_hash(parent_hash: int | None, tokens: Sequence[int]) -> int:
    """The engine's `compute_block_hash`, 256 bits wide and namespaced: a page's key
    chains its parent's (or, for the first page, the current request's namespace) with
    its token ids."""
    digest = hashlib.blake2b(digest_size=_DIGEST_BYTES)
    if parent_hash is None:
        digest.update(getattr(_current, "namespace", _NO_NAMESPACE))
    else:
        digest.update(parent_hash.to_bytes(_DIGEST_BYTES, "little"))
    digest.update(array("i", tokens).tobytes())
    return int.from_bytes(digest.digest(), "little")


@contextmanager
def hashing_for(namespace: bytes) -> Iterator[None]:
    _current.namespace = namespace
    try:
        yield
    finally:
        _current.namespace = _NO_NAMESPACE


@dataclass(slots=True)
class PrefixCounters:
    """Written by the generation thread, read anywhere (plain ints)."""

    reused_tokens: int = 0  # prompt tokens shared from kept or running pages
    read_tokens: int = 0  # prompt tokens read
    evicted_pages: int = 0  # kept pages dropped (the budget, or the pool running short)
    kept_pages: int = 0  # pages kept, referenced by no request
    kept_bytes: int = 0


OnMatch = Callable[[str, int], None]  # request id, prompt tokens reused


class PrefixReuse:
    """The hooks, their per-request namespaces and their counters (one per manager)."""

    def __init__(self, budget_bytes: int, on_match: OnMatch) -> None:
        self.budget_bytes = budget_bytes
        self.counters = PrefixCounters()
        self._on_match = on_match
        self._namespaces: dict[str, bytes] = {}  # request id -> digest, until released
        self._reported: set[str] = set()
        self._cache: Any = None

    # -- the backend's side (trio thread) -------------------------------------------------

    def register(self, request_id: str, namespace: str | None) -> None:
        """Before the request is queued: the namespace its pages are keyed in."""
        self._namespaces[request_id] = namespace_digest(namespace)

    def release(self, request_id: str) -> None:
        """Once the request is over for its consumer."""
        self._namespaces.pop(request_id, None)
        self._reported.discard(request_id)

    # -- the engine's side (its generation thread) --------------------------------------

    def install(self, cache: Any) -> bool:
        """Hook into the engine's `PagedAttentionCache`; False (sharing left off) when
        this transformers does not have the internals the hooks need."""
        if cache is self._cache:
            return True  # the manager reuses its batch processor after a restart
        if not cache.use_prefix_sharing:
            return False
        if not _has_internals(cache):
            log.warning(
                "this transformers version's paged cache lacks the internals prefix reuse "
                "hooks into: page sharing is off (every prompt is read whole)"
            )
            cache.use_prefix_sharing = False
            cache.allow_block_sharing = False
            return False
        from transformers.generation.continuous_batching.cache_allocators import cache_allocator

        cache_allocator.compute_block_hash = page_hash  # same signature, wider, namespaced
        self._cache = cache
        search, mark = cache.search_prefix_match, cache.mark_complete_blocks
        free, evict = cache.free_blocks, cache.evict_cached_blocks

        def search_prefix_match(request_id: str, prompt_ids: list[int]) -> int:
            with hashing_for(self._namespace(request_id)):
                matched = int(search(request_id, prompt_ids))
            self._matched(request_id, matched, len(prompt_ids))
            return matched

        def mark_complete_blocks(state: Any, complete_blocks: dict[str, int]) -> None:
            with hashing_for(self._namespace(state.request_id)):
                mark(state, complete_blocks)
            self._refresh()

        def free_blocks(request_id: str, no_cache: bool = False) -> None:
            if not no_cache:
                # Released last page first: the kept set is ordered by release, and the
                # budget drops the oldest first, so a request's tail goes before its head.
                for allocator in cache.cache_allocators.values():
                    allocator.block_table.get(request_id, []).reverse()
            free(request_id, no_cache)
            self.trim()

        def evict_cached_blocks() -> bool:
            kept = self._kept_pages()
            evicted = bool(evict())
            self.counters.evicted_pages += kept - self._kept_pages()
            self._refresh()
            return evicted

        cache.search_prefix_match = search_prefix_match
        cache.mark_complete_blocks = mark_complete_blocks
        cache.free_blocks = free_blocks
        cache.evict_cached_blocks = evict_cached_blocks
        return True

    def trim(self) -> None:
        """Drop the least recently released kept pages until they fit the budget."""
        cache = self._cache
        if cache is None:
            return
        self._refresh()
        for allocator in cache.cache_allocators.values():
            ledger = allocator.ledger
            while ledger.cached_blocks and self.counters.kept_bytes > self.budget_bytes:
                page = next(iter(ledger.cached_blocks))
                del ledger.cached_blocks[page]
                ledger.hash_to_block.pop(ledger.block_to_hash.pop(page), None)
                cache.pool.free_blocks(allocator.index, [page])
                self.counters.evicted_pages += 1
                self.counters.kept_pages -= 1
                self.counters.kept_bytes -= allocator.bytes_per_block

    def _namespace(self, request_id: str) -> bytes:
        return self._namespaces.get(request_id, _NO_NAMESPACE)

    def _matched(self, request_id: str, matched: int, prompt_tokens: int) -> None:
        # A request soft-reset by the engine is matched again with its generated tokens
        # as prompt: only its admission counts.
        if request_id in self._reported or request_id not in self._namespaces:
            return
        self._reported.add(request_id)
        self.counters.reused_tokens += matched
        self.counters.read_tokens += prompt_tokens - matched
        self._refresh()  # shared pages left the kept set
        self._on_match(request_id, matched)

    def _kept_pages(self) -> int:
        return sum(len(a.ledger.cached_blocks) for a in self._cache.cache_allocators.values())

    def _refresh(self) -> None:
        allocators = self._cache.cache_allocators.values()
        self.counters.kept_pages = sum(len(a.ledger.cached_blocks) for a in allocators)
        self.counters.kept_bytes = sum(
            len(a.ledger.cached_blocks) * a.bytes_per_block for a in allocators
        )


def _has_internals(cache: Any) -> bool:
    try:
        from transformers.generation.continuous_batching.cache_allocators import (
            cache_allocator,
        )
    except ImportError:
        return False
    if not callable(getattr(cache_allocator, "compute_block_hash", None)):
        return False
    methods = ("search_prefix_match", "mark_complete_blocks", "free_blocks", "evict_cached_blocks")
    if not all(callable(getattr(cache, name, None)) for name in methods):
        return False
    if not callable(getattr(getattr(cache, "pool", None), "free_blocks", None)):
        return False
    for allocator in getattr(cache, "cache_allocators", {}).values():
        ledger = getattr(allocator, "ledger", None)
        fields = ("cached_blocks", "hash_to_block", "block_to_hash")
        if not all(isinstance(getattr(ledger, name, None), dict) for name in fields):
            return False
        if not isinstance(getattr(allocator, "block_table", None), dict):
            return False
        if not isinstance(getattr(allocator, "bytes_per_block", None), int):
            return False
    return True
