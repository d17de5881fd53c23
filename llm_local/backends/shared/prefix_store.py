"""Which cached sequence a prompt extends, what the cache holds, what to evict: pure.

A backend that keeps finished requests' key/value state (llama.cpp sequences in one
context) describes each sequence here by the token ids whose state it holds, position by
position, under a `Namespace` (model, adapter, tenant salt). A new prompt is matched against
every sequence of its namespace: the longest run of equal ids from position 0 is what it
may reuse; nothing else counts (exact or nothing: a cache that guesses restores another
caller's conversation, as llama.cpp's host cache once did, ggml-org/llama.cpp issue 27148).

Sharing. A sequence may start as a copy of another's first n positions (llama.cpp's
``llama_memory_seq_cp`` shares those cells, it copies nothing): both then hold the same
cells. To count memory exactly the store tracks cells as *blocks*: every sequence appends
into a block of its own, and holds a list of ``(block, length)`` pieces; a copy takes the
source's pieces cut at n; a cut (``seq_rm`` of a tail) shortens the pieces. A block is only
ever appended to by the sequence that opened it, and a cut opens a fresh one, so the cells
in use are, per block, the longest length any sequence holds of it.

Budget. Cells that only idle sequences hold are the cache's cost: `idle_cells` says how
many; the backend evicts least recently used idle sequences (`lru_idle`) while that is over
its budget, or while a newcomer needs room or a sequence id. Running sequences are never
evicted. No I/O, no clock (a counter orders uses), no locks: one thread owns a store.
"""

from __future__ import annotations

import itertools
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

H = TypeVar("H", bound=Hashable)


@dataclass(frozen=True, slots=True)
class Namespace:
    """Sequences may share state only within one namespace.

    `adapter`: the LoRA adapter the state was computed with (None: the base model);
    `salt`: set to the tenant's id when tenants are isolated, so that one tenant never
    reuses (nor times) another's prefix (vLLM's ``cache_salt``)."""

    model: str
    adapter: str | None = None
    salt: str | None = None


@dataclass(frozen=True, slots=True)
class Match(Generic[H]):
    """Reuse `length` leading tokens held by sequence `handle`."""

    handle: H
    length: int
    idle: bool  # the source finished: it may be taken over
    whole: bool  # `length` is everything the source holds: taking it over loses nothing


@dataclass(slots=True)
class _Entry:
    namespace: Namespace
    tokens: list[int]
    pieces: list[list[int]]  # [block, length]; the last is the sequence's own block
    running: bool
    used: int  # the store's use counter at the last start or finish


@dataclass(slots=True)
class StoreCounters:
    reused_tokens: int = 0  # prompt tokens not read because a sequence held them
    evictions: int = 0  # idle sequences dropped to make room or keep the budget


class PrefixStore(Generic[H]):
    """The sequences of one engine context and the tokens each holds."""

    def __init__(self) -> None:
        self._entries: dict[H, _Entry] = {}
        self._blocks = itertools.count()
        self._uses = itertools.count()
        self.counters = StoreCounters()

    # -- reading -----------------------------------------------------------------------------

    def __contains__(self, handle: object) -> bool:
        return handle in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def tokens(self, handle: H) -> Sequence[int]:
        return self._entries[handle].tokens

    def namespace(self, handle: H) -> Namespace:
        return self._entries[handle].namespace

    def is_idle(self, handle: H) -> bool:
        return not self._entries[handle].running

    def idle_handles(self) -> list[H]:
        return [h for h, e in self._entries.items() if not e.running]

    def best_match(self, namespace: Namespace, prompt: Sequence[int]) -> Match[H] | None:
        """The sequence of `namespace` sharing the longest leading run with `prompt`.

        At most ``len(prompt) - 1`` tokens are offered: the last prompt token must be read
        for the logits of the first new token. Ties go to an idle sequence that would be
        used whole, then to the most recently used. None when nothing matches.
        """
        limit = len(prompt) - 1
        best: tuple[int, bool, int] | None = None
        chosen: Match[H] | None = None
        for handle, entry in self._entries.items():
            if entry.namespace != namespace:
                continue
            length = min(common_prefix(entry.tokens, prompt), limit)
            if length <= 0:
                continue
            whole = length == len(entry.tokens)
            rank = (length, whole and not entry.running, entry.used)
            if best is None or rank > best:
                best = rank
                chosen = Match(handle, length, idle=not entry.running, whole=whole)
        return chosen

    def cells(self) -> int:
        """Cells every sequence together holds (shared cells once)."""
        return _unique_cells(self._entries.values())

    def idle_cells(self) -> int:
        """Cells that only idle sequences hold: what keeping them costs."""
        running = [e for e in self._entries.values() if e.running]
        return self.cells() - _unique_cells(running)

    def lru_idle(self, *, keep: H | None = None) -> H | None:
        """The least recently used idle sequence (other than `keep`), or None."""
        idle = [(e.used, h) for h, e in self._entries.items() if not e.running and h != keep]
        if not idle:
            return None
        return min(idle, key=lambda pair: pair[0])[1]

    # -- changes -----------------------------------------------------------------------------

    def open(self, handle: H, namespace: Namespace) -> None:
        """A running sequence that holds nothing yet."""
        if handle in self._entries:
            raise ValueError(f"sequence {handle!r} is already tracked")
        self._entries[handle] = _Entry(
            namespace, [], [[next(self._blocks), 0]], running=True, used=next(self._uses)
        )

    def copy_prefix(self, source: H, handle: H, length: int) -> None:
        """`handle` (new, running) starts with `source`'s first `length` cells, shared."""
        if handle in self._entries:
            raise ValueError(f"sequence {handle!r} is already tracked")
        src = self._entries[source]
        if not 0 < length <= len(src.tokens):
            raise ValueError(f"cannot share {length} of {len(src.tokens)} tokens")
        self._entries[handle] = _Entry(
            src.namespace,
            list(src.tokens[:length]),
            [*_cut(src.pieces, length), [next(self._blocks), 0]],
            running=True,
            used=next(self._uses),
        )
        src.used = next(self._uses)
        self.counters.reused_tokens += length

    def take_over(self, handle: H, length: int) -> None:
        """An idle sequence runs again, keeping its first `length` cells (its tail cut)."""
        entry = self._entries[handle]
        if entry.running:
            raise ValueError(f"sequence {handle!r} is running")
        self.truncate(handle, length)
        entry.running = True
        entry.used = next(self._uses)
        self.counters.reused_tokens += length

    def truncate(self, handle: H, length: int) -> None:
        """Keep the first `length` cells (``seq_rm`` of the rest); appends go to a new block."""
        entry = self._entries[handle]
        if not 0 <= length <= len(entry.tokens):
            raise ValueError(f"cannot keep {length} of {len(entry.tokens)} tokens")
        if length == len(entry.tokens):
            return
        del entry.tokens[length:]
        entry.pieces = [*_cut(entry.pieces, length), [next(self._blocks), 0]]

    def append(self, handle: H, tokens: Sequence[int]) -> None:
        """The sequence's cells for `tokens`, at the next positions, were computed."""
        entry = self._entries[handle]
        entry.tokens.extend(tokens)
        entry.pieces[-1][1] += len(tokens)

    def finish(self, handle: H) -> None:
        """The sequence's request ended: it stays, idle, for a later prompt to extend."""
        entry = self._entries[handle]
        entry.running = False
        entry.used = next(self._uses)

    def drop(self, handle: H, *, evicted: bool = False) -> None:
        """Forget the sequence (its cells were freed)."""
        del self._entries[handle]
        if evicted:
            self.counters.evictions += 1


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading ids `a` and `b` share."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _cut(pieces: list[list[int]], length: int) -> list[list[int]]:
    """The pieces covering the first `length` cells."""
    cut: list[list[int]] = []
    left = length
    for block, size in pieces:
        if left <= 0:
            break
        take = min(size, left)
        if take > 0:
            cut.append([block, take])
        left -= take
    return cut


def _unique_cells(entries: Iterable[_Entry]) -> int:
    longest: dict[int, int] = {}
    for entry in entries:
        for block, size in entry.pieces:
            if size > longest.get(block, 0):
                longest[block] = size
    return sum(longest.values())


P = TypeVar("P")


@dataclass(slots=True)
class _HostEntry(Generic[P]):
    namespace: Namespace
    tokens: tuple[int, ...]
    payload: P
    size: int
    used: int


class HostCache(Generic[P]):
    """Sequences moved out of the engine into host memory (a saved state, `payload`), found
    by the same exact match as kept sequences; least recently stored go first."""

    def __init__(self) -> None:
        self._entries: dict[int, _HostEntry[P]] = {}
        self._ids = itertools.count()
        self.bytes = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, namespace: Namespace, tokens: Sequence[int], payload: P, size: int) -> int:
        key = next(self._ids)
        self._entries[key] = _HostEntry(namespace, tuple(tokens), payload, size, key)
        self.bytes += size
        return key

    def best_match(self, namespace: Namespace, prompt: Sequence[int]) -> tuple[int, int] | None:
        """(key, tokens to reuse) of the longest exact match, at most ``len(prompt) - 1``."""
        best: tuple[int, int] | None = None
        for key, entry in self._entries.items():
            if entry.namespace != namespace:
                continue
            length = min(common_prefix(entry.tokens, prompt), len(prompt) - 1)
            if length > 0 and (best is None or length > best[1]):
                best = (key, length)
        return best

    def peek(self, key: int) -> tuple[tuple[int, ...], P]:
        """The entry's tokens and payload; it stays (a copy goes back into the engine)."""
        entry = self._entries[key]
        return entry.tokens, entry.payload

    def take(self, key: int) -> tuple[tuple[int, ...], P]:
        """Remove the entry (it goes back into the engine): its tokens and payload."""
        entry = self._entries.pop(key)
        self.bytes -= entry.size
        return entry.tokens, entry.payload

    def evict_lru(self) -> bool:
        """Drop the least recently stored entry; False when empty."""
        if not self._entries:
            return False
        key = min(self._entries)
        self.bytes -= self._entries.pop(key).size
        self.evictions += 1
        return True
