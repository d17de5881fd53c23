"""Continuous batching over one llama.cpp context, on one worker thread.

Every request is a llama.cpp sequence in one context. Each step the worker:

1. drops requests whose consumer left (their sequence's KV cache and sampler are freed:
   a cancelled request stops within one step);
2. gives free sequences to waiting requests (`policy.admit`: tenants take turns);
3. plans the batch (`policy.plan_step`: one token per decoding sequence, newcomers'
   prompts in chunks), fills one `llama_batch` and calls `llama_decode` once;
4. samples the next token of every sequence whose row has logits, with its own sampler
   chain, and offers it to the request's `BatchItem`: tokens cross into trio through the
   shared bridge, one crossing per step for all requests.

A request that arrives while others decode joins at the next step. The library is called
from this thread only (after loading): a llama_context is not thread-safe.

A failed `llama_decode` fails the requests of that step (their sequences freed) and the
loop goes on; an exception escaping the loop itself fails everything and stops it.

Prefix reuse (`ReuseOptions`; the bookkeeping is backends/shared/prefix_store.py). A
request that ends keeps its sequence: the cells of every token it fed (its prompt, and
its answer but the last sampled token, never fed) stay in the KV cache, idle. A newcomer
is matched against every sequence of its namespace (model, adapter, and the tenant when
tenants are isolated): with the longest exact run of ids from position 0,

- an idle sequence it extends whole (a call's next turn) is taken over: its tail past the
  match is removed (``llama_memory_seq_rm``) and the newcomer reads only what follows;
- a partial match (the persona of another call, a running call's prompt, a turn whose
  answer re-encoded to other ids) is shared into a fresh sequence
  (``llama_memory_seq_cp``: the cells are shared, nothing is copied) and the source stays.

The library is asked afterwards what the sequence holds (``seq_pos_min/max``): anything
but exactly positions 0..n-1 (a model whose memory cannot be cut there) drops the reuse
and reads the prompt whole. Idle sequences go least recently used first: while the cells
only they hold exceed the budget, when a newcomer needs a sequence id, and when the
running requests' reservations leave the pool too little room. In the last two cases the
sequence is first saved to host memory (``llama_state_seq_get_data``), within the same
budget; a prompt that extends a saved sequence further than any in the context gets it back
(``llama_state_seq_set_data`` into a free sequence, then cut to the match).
"""

from __future__ import annotations

import ctypes
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from llm_local.backends.base import BackendError, BackendStats
from llm_local.backends.llama_cpp.constrained import MaskWorker, mask_row
from llm_local.backends.llama_cpp.library import AdapterSwitch
from llm_local.backends.llama_cpp.policy import BASE, admit, pick_adapter, plan_step
from llm_local.backends.llama_cpp.sampling import SamplerChain
from llm_local.backends.shared.bridge import BatchItem
from llm_local.backends.shared.costs import CostModel
from llm_local.backends.shared.grammar import GrammarCompiler, TokenMask
from llm_local.backends.shared.prefix_store import HostCache, Namespace, PrefixStore

log = logging.getLogger(__name__)


class SchedulerClosedError(BackendError):
    """The backend is closing or closed: the generation cannot run."""


@dataclass(frozen=True, slots=True)
class ReuseOptions:
    """Prefix reuse in one context (module docstring); `budget_tokens` 0 = none."""

    model: str  # the namespace's model: state of another model never matches
    budget_tokens: int  # KV cells that idle sequences alone may hold
    cache_sequences: int  # sequence ids beyond the running ones, for idle sequences
    isolate_tenants: bool = False
    # KV bytes of one token; above 0, a sequence evicted for room or for its id (not for
    # the budget) is saved to host memory (llama_state_seq_get_data) within the same budget
    # and restored (set_data) for a prompt that extends it further than any kept sequence.
    bytes_per_token: int = 0

    @property
    def budget_bytes(self) -> int:
        return self.budget_tokens * self.bytes_per_token


NO_REUSE = ReuseOptions(model="", budget_tokens=0, cache_sequences=0)


@dataclass(frozen=True, slots=True)
class ReuseStats:
    """Prefix reuse so far (counters) and now (gauges), for /metrics."""

    reused_tokens: int
    read_tokens: int  # prompt tokens read through llama_decode
    evictions: int
    idle_sequences: int
    idle_tokens: int
    host_sequences: int = 0  # saved to host memory
    host_bytes: int = 0
    restores: int = 0  # host copies put back into the context for a prompt


@dataclass(eq=False, slots=True)
class _Running:
    """A request that holds a sequence: worker thread only."""

    item: BatchItem
    seq_id: int
    chain: SamplerChain
    prompt: list[int]
    fed: int = 0  # tokens in the KV cache
    next_token: int | None = None  # sampled, to be fed at the next step
    mask: TokenMask | None = None  # structured output: the grammar's state (constrained.py)
    adapter: str = BASE  # the LoRA adapter it decodes with (policy.pick_adapter)

    @property
    def prompt_left(self) -> int:
        return max(0, len(self.prompt) - self.fed)


@dataclass(frozen=True, slots=True)
class StepShape:
    """What one step fed: reported to the `on_step` observer (tests, debugging)."""

    decoding: int
    prefill_tokens: int
    seq_ids: tuple[int, ...] = field(default=())
    adapter: str = BASE  # the LoRA adapter the step decoded with


class LlamaScheduler:
    """Requests in, tokens out; `start` once, `close` + `join` at the end."""

    def __init__(
        self,
        lib: Any,
        ctx: Any,
        memory: Any,
        *,
        sequences: int,
        kv_cache_tokens: int,
        context_per_sequence: int,
        batch_tokens: int,
        prefill_chunk_tokens: int,
        vocab_size: int,
        end_token_ids: frozenset[int],
        costs: CostModel,
        on_step: Callable[[StepShape], None] | None = None,
        reuse: ReuseOptions = NO_REUSE,
        grammar: GrammarCompiler | None = None,
        adapters: Mapping[str, Any] | None = None,
        shared_pool: bool = True,
    ) -> None:
        """`adapters`: LoRA adapter id -> the library's adapter, for `submit`.
        `shared_pool`: the sequences draw from one KV pool of `kv_cache_tokens` (admission
        keeps the running requests within it); False: each has a stream of its own, of
        `context_per_sequence` cells, which validation keeps every request within."""
        self._lib = lib
        self._ctx = ctx
        self._memory = memory
        self._sequences = sequences
        self._kv_cache_tokens = kv_cache_tokens
        self._shared_pool = shared_pool
        self._context_per_sequence = context_per_sequence
        self._batch_tokens = batch_tokens
        self._prefill_chunk_tokens = prefill_chunk_tokens
        self._vocab_size = vocab_size
        self._end_ids = end_token_ids
        self._costs = costs
        self._on_step = on_step
        self._grammar = grammar
        self._masks = MaskWorker()
        self._condition = threading.Condition()
        self._waiting: list[BatchItem] = []  # guarded by _condition
        self._closing = False  # guarded by _condition
        self._running: list[_Running] = []  # worker thread only
        self._running_count = 0  # what stats() reads
        self._reuse = reuse
        self._store: PrefixStore[int] = PrefixStore()
        self._host: HostCache[Any] = HostCache()
        self._restores = 0
        self._read_tokens = 0  # prompt tokens fed (worker thread; read by stats)
        self._reuse_stats = ReuseStats(0, 0, 0, 0, 0)  # a snapshot the worker replaces
        cache_ids = reuse.cache_sequences if reuse.budget_tokens > 0 else 0
        self._free_ids = list(range(sequences + cache_ids))
        self._thread: threading.Thread | None = None
        self._adapters = dict(adapters or {})
        self._adapter_of: dict[BatchItem, str] = {}  # waiting items' adapters; _condition
        self._switch = AdapterSwitch(lib, ctx)
        self._last_adapter: str | None = None
        # Kept referenced for as long as the library may read it.
        self._batch = lib.llama_batch_init(batch_tokens, 0, 1)

    # -- any thread -------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="llama-cpp-decode", daemon=True)
        self._thread.start()

    def submit(self, item: BatchItem, adapter: str = BASE) -> None:
        """Queue `item`; it decodes with the LoRA adapter `adapter` (an id given at
        construction; BASE: none)."""
        if adapter != BASE and adapter not in self._adapters:
            raise BackendError(f"unknown LoRA adapter {adapter!r}")
        with self._condition:
            if self._closing:
                raise SchedulerClosedError("the backend is closing")
            if adapter != BASE:
                self._adapter_of[item] = adapter
            self._waiting.append(item)
            self._condition.notify()

    def withdraw(self, item: BatchItem) -> None:
        """The consumer left: a waiting item leaves the queue, a running one stops at the
        next step (the worker sees it inactive)."""
        item.cancel()
        with self._condition:
            if item in self._waiting:
                self._waiting.remove(item)
                self._adapter_of.pop(item, None)
            self._condition.notify()

    def stats(self) -> BackendStats:
        with self._condition:
            queued = len(self._waiting)
        running = self._running_count
        costs = self._costs.estimate()
        return BackendStats(
            running=running,
            queued=queued,
            batches=1 if running else 0,
            step_seconds=costs.step_s(1),
            step_seconds_per_item=costs.step_per_item_s,
            prefill_token_seconds=costs.prefill_token_s,
        )

    def reuse_stats(self) -> ReuseStats:
        return self._reuse_stats

    def close(self) -> None:
        """Fail what waits, stop what runs; the worker ends after its current step."""
        with self._condition:
            self._closing = True
            waiting, self._waiting = self._waiting, []
            self._condition.notify()
        for item in waiting:
            item.fail(SchedulerClosedError("the backend is closing"))

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the worker (blocking); True once it has ended and freed its batch."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                return False
        return True

    # -- the worker thread -------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while self._next_step():
                pass
        except BaseException as exc:
            log.exception("the llama.cpp decoding loop failed")
            for running in self._running:
                running.item.end_from_thread(BackendError(f"llama.cpp decoding failed: {exc}"))
            with self._condition:
                self._closing = True
                waiting, self._waiting = self._waiting, []
            for item in waiting:
                item.end_from_thread(SchedulerClosedError("the decoding loop failed"))
        finally:
            for running in list(self._running):
                self._release(running, keep=False)
            self._running_count = 0
            self._lib.llama_batch_free(self._batch)
            self._masks.close()

    def _next_step(self) -> bool:
        """One step; False once closing."""
        with self._condition:
            while not self._closing and not self._waiting and not self._running:
                self._condition.wait()
            if self._closing:
                for running in self._running:
                    running.item.end_from_thread(SchedulerClosedError("the backend is closing"))
                return False
            for running in [r for r in self._running if not r.item.active]:
                self._release(running)
            self._waiting = [item for item in self._waiting if item.active]
            starting = admit(
                self._waiting,
                self._sequences - len(self._running),
                lambda item: item.tenant_id,
                reserve=_reserve,
                free_tokens=self._free_pool_tokens(),
            )
            for item in starting:
                self._waiting.remove(item)
            adapters = [self._adapter_of.pop(item, BASE) for item in starting]
            self._adapter_of = {i: a for i, a in self._adapter_of.items() if i.active}
        for item, adapter in zip(starting, adapters, strict=True):
            self._start(item, adapter)
        self._running_count = len(self._running)
        if self._running:
            self._decode_step()
        return True

    def _free_pool_tokens(self) -> int:
        """What the running requests leave of the shared pool for newcomers (per
        sequence: no limit, each stream holds what validation lets a request hold)."""
        if not self._shared_pool:
            return 1 << 62
        return self._kv_cache_tokens - sum(_reserve(running.item) for running in self._running)

    def _start(self, item: BatchItem, adapter: str = BASE) -> None:
        seq_id, reused = self._claim_sequence(item, adapter)
        item.cached_tokens = reused
        chain = SamplerChain(self._lib, item.sampling, self._vocab_size)
        chain.accept_prompt(item.prompt_ids)
        running = _Running(item, seq_id, chain, list(item.prompt_ids), fed=reused, adapter=adapter)
        self._running.append(running)
        constraint = item.sampling.constraint
        if constraint is not None:
            if self._grammar is None:  # validation refuses it before: only a bug gets here
                item.end_from_thread(BackendError("structured output is not available"))
                self._release(running, keep=False)
                return
            running.mask = self._grammar.matcher(constraint)
        self._make_room()

    def _namespace(self, item: BatchItem, adapter: str) -> Namespace:
        # KV cells computed under one adapter are another model's for the next.
        salt = (item.tenant_id or "") if self._reuse.isolate_tenants else None
        return Namespace(self._reuse.model, adapter=adapter or None, salt=salt)

    def _claim_sequence(self, item: BatchItem, adapter: str) -> tuple[int, int]:
        """A sequence for `item` and how many of its prompt tokens it already holds."""
        store, namespace = self._store, self._namespace(item, adapter)
        if self._reuse.budget_tokens <= 0:
            seq_id = self._free_id(keep=None)
            store.open(seq_id, namespace)
            return seq_id, 0
        match = store.best_match(namespace, item.prompt_ids)
        host = self._host.best_match(namespace, item.prompt_ids)
        if host is not None and host[1] > (0 if match is None else match.length):
            return self._restore(namespace, *host)
        if match is None:
            seq_id = self._free_id(keep=None)
            store.open(seq_id, namespace)
            return seq_id, 0
        if match.idle and (match.whole or not self._can_free_id(keep=match.handle)):
            seq_id, length = match.handle, match.length
            self._lib.llama_memory_seq_rm(self._memory, seq_id, length, -1)
            store.take_over(seq_id, length)
        else:
            seq_id, length = self._free_id(keep=match.handle), match.length
            self._share_prefix(match.handle, seq_id, length)
            store.copy_prefix(match.handle, seq_id, length)
        if not self._holds_exactly(seq_id, length):
            # The library could not keep just those positions: read the prompt whole.
            self._lib.llama_memory_seq_rm(self._memory, seq_id, -1, -1)
            store.truncate(seq_id, 0)
            store.counters.reused_tokens -= length
            return seq_id, 0
        return seq_id, length

    def _share_prefix(self, source: int, seq_id: int, length: int) -> None:
        """`seq_id` gets `source`'s first `length` cells. In one pool the cells are shared
        (no copy); between streams the library copies only a whole stream, so the copy's
        tail is cut afterwards."""
        lib, memory = self._lib, self._memory
        if self._shared_pool:
            lib.llama_memory_seq_cp(memory, source, seq_id, 0, length)
            return
        lib.llama_memory_seq_cp(memory, source, seq_id, -1, -1)
        lib.llama_memory_seq_rm(memory, seq_id, length, -1)

    def _restore(self, namespace: Namespace, key: int, length: int) -> tuple[int, int]:
        """Put a host copy back into a free sequence; keep its first `length` cells. A copy
        the prompt extends whole (a call's next turn) leaves host memory; one it shares
        only a part of (another call's persona) stays there for its own call."""
        seq_id = self._free_id(keep=None)
        store, lib = self._store, self._lib
        store.open(seq_id, namespace)
        tokens, state = self._host.peek(key)
        if length >= len(tokens):
            self._host.take(key)
        read = int(lib.llama_state_seq_set_data(self._ctx, state, len(state), seq_id))
        if read == 0:  # no room for its cells, or a state this context cannot take
            lib.llama_memory_seq_rm(self._memory, seq_id, -1, -1)
            return seq_id, 0
        store.append(seq_id, tokens)
        lib.llama_memory_seq_rm(self._memory, seq_id, length, -1)
        store.truncate(seq_id, length)
        if not self._holds_exactly(seq_id, length):
            lib.llama_memory_seq_rm(self._memory, seq_id, -1, -1)
            store.truncate(seq_id, 0)
            return seq_id, 0
        store.counters.reused_tokens += length
        self._restores += 1
        return seq_id, length

    def _holds_exactly(self, seq_id: int, length: int) -> bool:
        lib, memory = self._lib, self._memory
        return (
            int(lib.llama_memory_seq_pos_min(memory, seq_id)) == 0
            and int(lib.llama_memory_seq_pos_max(memory, seq_id)) == length - 1
        )

    def _can_free_id(self, *, keep: int | None) -> bool:
        return bool(self._free_ids) or self._store.lru_idle(keep=keep) is not None

    def _free_id(self, *, keep: int | None) -> int:
        """A sequence id that holds nothing, evicting the least recently used idle one
        (never `keep`, the source being matched) when none is free."""
        if not self._free_ids:
            victim = self._store.lru_idle(keep=keep)
            if victim is None:  # admission keeps running requests below the ids
                raise BackendError("no free llama.cpp sequence")
            self._evict(victim, spill=True)
        return self._free_ids.pop(0)

    def _evict(self, seq_id: int, *, spill: bool) -> None:
        """Free an idle sequence's cells; with `spill`, save its state to host memory first
        (it stays within the budget: it leaves the context as it enters the host)."""
        moved = spill and self._reuse.bytes_per_token > 0 and self._spill(seq_id)
        self._lib.llama_memory_seq_rm(self._memory, seq_id, -1, -1)
        self._store.drop(seq_id, evicted=not moved)
        self._free_ids.append(seq_id)

    def _spill(self, seq_id: int) -> bool:
        """Save an idle sequence's state to host memory; False if it was not saved."""
        lib = self._lib
        size = int(lib.llama_state_seq_get_size(self._ctx, seq_id))
        if size <= 0 or size > self._reuse.budget_bytes:
            return False
        state = (ctypes.c_uint8 * size)()
        if int(lib.llama_state_seq_get_data(self._ctx, state, size, seq_id)) != size:
            return False
        namespace = self._store.namespace(seq_id)
        self._host.add(namespace, self._store.tokens(seq_id), state, size)
        return True

    def _make_room(self) -> None:
        """Evict idle sequences, least recently used first, while the cells they alone
        hold exceed the budget or leave the running requests too little of the pool; and,
        in one pool, every idle sequence to host memory while anything decodes.

        Why the last: in one pool a token's attention scans the pool's whole used range,
        idle cells included (bench/llama_cpp_kv_layout.py: 16 idle sequences of 120
        tokens made a step of 16 cost 1.14x instead of 1.07x a stream each's), at every
        step of every running request; saving a sequence costs one copy
        (llama_state_seq_get_data, milliseconds) and bringing it back for its next turn
        another, so an idle sequence is cheaper in host memory whenever others decode.
        With nothing running it stays: it costs nothing there and is the quickest to
        reuse."""
        room = self._free_pool_tokens()
        per_token = max(1, self._reuse.bytes_per_token)
        budget_cells = self._reuse.budget_tokens
        while True:
            idle = self._store.idle_cells()
            held = idle + -(-self._host.bytes // per_token)  # host bytes as cells, rounded up
            if held > budget_cells and self._host.evict_lru():
                continue  # host copies left the context earlier: the oldest go first
            if idle == 0:
                break
            over_budget = held > budget_cells
            crowded = self._shared_pool and bool(self._running)
            if not over_budget and idle <= room and not crowded:
                break
            victim = self._store.lru_idle()
            if victim is None:
                break
            self._evict(victim, spill=not over_budget)
        self._publish_reuse()

    def _publish_reuse(self) -> None:
        counters = self._store.counters
        self._reuse_stats = ReuseStats(
            reused_tokens=counters.reused_tokens,
            read_tokens=self._read_tokens,
            evictions=counters.evictions + self._host.evictions,
            idle_sequences=len(self._store.idle_handles()),
            idle_tokens=self._store.idle_cells(),
            host_sequences=len(self._host),
            host_bytes=self._host.bytes,
            restores=self._restores,
        )

    def _release(self, running: _Running, *, keep: bool = True) -> None:
        """The request ended: its sampler is freed; its sequence stays, idle, for a later
        prompt to extend (`keep`, with reuse on), or its cells are freed."""
        self._running.remove(running)
        running.chain.free()
        if keep and self._reuse.budget_tokens > 0:
            self._store.finish(running.seq_id)
            self._make_room()
            return
        self._lib.llama_memory_seq_rm(self._memory, running.seq_id, -1, -1)
        self._store.drop(running.seq_id)
        self._free_ids.append(running.seq_id)
        self._publish_reuse()

    def _decode_step(self) -> None:
        # One adapter per step: the library applies it to the whole context.
        adapter = pick_adapter([r.adapter for r in self._running], self._last_adapter)
        members = [r for r in self._running if r.adapter == adapter]
        self._last_adapter = adapter
        self._switch.apply(self._adapters.get(adapter))
        plan = plan_step(
            [running.prompt_left for running in members],
            prefill_chunk_tokens=self._prefill_chunk_tokens,
            batch_tokens=self._batch_tokens,
        )
        batch = self._batch
        rows: list[tuple[_Running, int]] = []  # who samples from which batch row
        fed: list[tuple[_Running, int]] = []
        n = 0
        for running, count in zip(members, plan, strict=True):
            if count == 0:
                continue
            if running.prompt_left == 0:
                assert running.next_token is not None
                tokens = [running.next_token]
            else:
                tokens = running.prompt[running.fed : running.fed + count]
            if running.fed + len(tokens) > self._context_per_sequence:
                # Validation keeps prompt + completion within the context limit; this
                # guards the library against a request that got past it anyway.
                running.item.end_from_thread(None)
                continue
            for offset, token in enumerate(tokens):
                batch.token[n] = token
                batch.pos[n] = running.fed + offset
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = running.seq_id
                batch.logits[n] = 0
                n += 1
            fed.append((running, len(tokens)))
            if running.fed + len(tokens) >= len(running.prompt):
                batch.logits[n - 1] = 1  # its prompt is read: sample from this row
                rows.append((running, n - 1))
        if n == 0:
            return
        batch.n_tokens = n
        decoding = sum(1 for running, _ in fed if running.prompt_left == 0)
        prefill_tokens = n - decoding
        # The grammar masks of this step compute meanwhile (constrained.py).
        masking = self._masks.start([r.mask for r, _ in rows if r.mask is not None])
        started = time.perf_counter()
        status = int(self._lib.llama_decode(self._ctx, batch))
        seconds = time.perf_counter() - started
        if masking is not None:
            masking.result()
        if status != 0:
            error = BackendError(f"llama_decode failed (status {status})")
            for running, _ in fed:
                running.item.end_from_thread(error)
                self._release(running, keep=False)  # what its cells hold is unknown
            self._running_count = len(self._running)
            return
        if prefill_tokens == 0:
            self._costs.observe_step(decoding, seconds)
        elif decoding == 0:
            self._costs.observe_prefill(prefill_tokens, seconds)
        if self._on_step is not None:
            seq_ids = tuple(r.seq_id for r, _ in fed)
            self._on_step(StepShape(decoding, prefill_tokens, seq_ids, adapter))
        for running, count in fed:
            if running.prompt_left > 0:
                self._read_tokens += min(count, running.prompt_left)
                tokens = running.prompt[running.fed : running.fed + count]
            else:
                assert running.next_token is not None
                tokens = [running.next_token]
            self._store.append(running.seq_id, tokens)
            running.fed += count
        for running, row in rows:
            if running.mask is not None:
                mask_row(self._lib, self._ctx, row, self._vocab_size, running.mask)
            token = running.chain.sample(self._ctx, row)
            if running.mask is not None and not running.mask.accept(token):
                why = running.mask.error or f"token {token} does not fit the grammar"
                running.item.end_from_thread(BackendError(f"structured output: {why}"))
                self._release(running)
                continue
            running.next_token = token
            is_end = token in self._end_ids
            if running.item.offer_token(token, is_end) or is_end:
                self._release(running)
        self._running_count = len(self._running)


def _reserve(item: BatchItem) -> int:
    """The KV cache tokens a request may come to hold: its prompt and every new token."""
    return item.prompt_length + item.max_new_tokens
