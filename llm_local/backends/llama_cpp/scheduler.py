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
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from llm_local.backends.base import BackendError, BackendStats
from llm_local.backends.llama_cpp.library import AdapterSwitch
from llm_local.backends.llama_cpp.policy import BASE, admit, pick_adapter, plan_step
from llm_local.backends.llama_cpp.sampling import SamplerChain
from llm_local.backends.shared.bridge import BatchItem
from llm_local.backends.shared.costs import CostModel

log = logging.getLogger(__name__)


class SchedulerClosedError(BackendError):
    """The backend is closing or closed: the generation cannot run."""


@dataclass(eq=False, slots=True)
class _Running:
    """A request that holds a sequence: worker thread only."""

    item: BatchItem
    seq_id: int
    chain: SamplerChain
    prompt: list[int]
    fed: int = 0  # tokens in the KV cache
    next_token: int | None = None  # sampled, to be fed at the next step
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
        adapters: Mapping[str, Any] | None = None,
    ) -> None:
        """`adapters`: LoRA adapter id -> the library's adapter, for `submit`."""
        self._lib = lib
        self._ctx = ctx
        self._memory = memory
        self._sequences = sequences
        self._kv_cache_tokens = kv_cache_tokens
        self._context_per_sequence = context_per_sequence
        self._batch_tokens = batch_tokens
        self._prefill_chunk_tokens = prefill_chunk_tokens
        self._vocab_size = vocab_size
        self._end_ids = end_token_ids
        self._costs = costs
        self._on_step = on_step
        self._condition = threading.Condition()
        self._waiting: list[BatchItem] = []  # guarded by _condition
        self._closing = False  # guarded by _condition
        self._running: list[_Running] = []  # worker thread only
        self._running_count = 0  # what stats() reads
        self._free_ids = list(range(sequences))
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
                self._release(running)
            self._running_count = 0
            self._lib.llama_batch_free(self._batch)

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
            reserved = sum(_reserve(running.item) for running in self._running)
            starting = admit(
                self._waiting,
                len(self._free_ids),
                lambda item: item.tenant_id,
                reserve=_reserve,
                free_tokens=self._kv_cache_tokens - reserved,
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

    def _start(self, item: BatchItem, adapter: str = BASE) -> None:
        seq_id = self._free_ids.pop(0)
        chain = SamplerChain(self._lib, item.sampling, self._vocab_size)
        chain.accept_prompt(item.prompt_ids)
        self._running.append(_Running(item, seq_id, chain, list(item.prompt_ids), adapter=adapter))

    def _release(self, running: _Running) -> None:
        """Free the request's sequence: its KV cache cells and its sampler."""
        self._running.remove(running)
        self._lib.llama_memory_seq_rm(self._memory, running.seq_id, -1, -1)
        running.chain.free()
        self._free_ids.append(running.seq_id)

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
        started = time.perf_counter()
        status = int(self._lib.llama_decode(self._ctx, batch))
        seconds = time.perf_counter() - started
        if status != 0:
            error = BackendError(f"llama_decode failed (status {status})")
            for running, _ in fed:
                running.item.end_from_thread(error)
                self._release(running)
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
            running.fed += count
        for running, row in rows:
            token = running.chain.sample(self._ctx, row)
            running.next_token = token
            is_end = token in self._end_ids
            if running.item.offer_token(token, is_end) or is_end:
                self._release(running)
        self._running_count = len(self._running)


def _reserve(item: BatchItem) -> int:
    """The KV cache tokens a request may come to hold: its prompt and every new token."""
    return item.prompt_length + item.max_new_tokens
