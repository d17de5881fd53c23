"""The llama_cpp backend: a GGUF served as is, continuous batching by our own scheduler.

`load` reads the GGUF into one llama.cpp context of `sequences` sequences on a thread,
then starts the scheduler's worker thread (scheduler.py). `generate` hands a `BatchItem`
to the scheduler and streams what the worker offers it; leaving the stream withdraws the
item, which frees its sequence at the next step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TYPE_CHECKING

import trio

from llm_local.backends.base import BackendError, BackendStats, ModelInfo
from llm_local.backends.llama_cpp.loader import LoadedModel, LoadPlan, load_model
from llm_local.backends.llama_cpp.policy import BASE
from llm_local.backends.llama_cpp.scheduler import (
    LlamaScheduler,
    ReuseOptions,
    StepShape,
)
from llm_local.backends.llama_cpp.tokenizer import LlamaVocabTokenizer
from llm_local.backends.shared.bridge import BatchItem, WakeupRelay
from llm_local.backends.shared.costs import CostModel
from llm_local.core.types import NO_HINTS, GenerationHints, SamplingOptions

if TYPE_CHECKING:
    from llm_local.settings.schema import AppSettings

STOP_TIMEOUT_S = 30.0


class LlamaCppBackend:
    """`Backend` over llama.cpp's library."""

    def __init__(
        self,
        plan: Callable[[], LoadPlan],
        *,
        on_step: Callable[[StepShape], None] | None = None,
    ) -> None:
        """`plan` runs on the loading thread; `on_step` sees every step (tests)."""
        self._plan = plan
        self._on_step = on_step
        self._model: LoadedModel | None = None
        self._scheduler: LlamaScheduler | None = None
        self._relay: WakeupRelay | None = None
        self._costs = CostModel()
        self._closed = False

    # -- Backend protocol -------------------------------------------------------------------

    @property
    def info(self) -> ModelInfo:
        return self._loaded().info

    @property
    def tokenizer(self) -> LlamaVocabTokenizer:
        return self._loaded().tokenizer

    async def load(self) -> None:
        if self._scheduler is not None:
            raise RuntimeError("the backend is already loaded")
        if self._closed:
            raise RuntimeError("the backend is closed")
        # On a thread: the event loop keeps answering health checks meanwhile.
        model = await trio.to_thread.run_sync(lambda: load_model(self._plan()))
        if self._closed:
            model.handle.free()
            raise RuntimeError("the backend was closed while loading")
        self._relay = WakeupRelay(trio.lowlevel.current_trio_token())
        handle = model.handle
        options = handle.context_options
        scheduler = LlamaScheduler(
            handle.lib,
            handle.ctx,
            handle.memory,
            sequences=options.sequences,
            kv_cache_tokens=options.kv_cache_tokens,
            shared_pool=options.shared_pool,
            context_per_sequence=handle.context_per_sequence,
            batch_tokens=options.batch_tokens,
            prefill_chunk_tokens=model.prefill_chunk_tokens,
            vocab_size=model.tokenizer.vocab_size,
            end_token_ids=model.tokenizer.end_token_ids,
            costs=self._costs,
            on_step=self._on_step,
            reuse=reuse_options(model, options.cache_sequences),
            grammar=model.grammar,
            adapters=model.adapters,
        )
        scheduler.start()
        self._model, self._scheduler = model, scheduler

    def generate(
        self,
        prompt_ids: Sequence[int],
        max_new_tokens: int,
        sampling: SamplingOptions,
        hints: GenerationHints = NO_HINTS,
    ) -> AbstractAsyncContextManager[AsyncIterator[Sequence[int]]]:
        # The tenant orders the waiting requests (tenants take turns, policy.admit).
        return self._generate(
            prompt_ids, max_new_tokens, sampling, hints.tenant_id, hints.adapter or BASE
        )

    def stats(self) -> BackendStats:
        scheduler, model = self._scheduler, self._model
        if scheduler is None or model is None:
            return BackendStats(running=0, queued=0, batches=0)
        reuse = scheduler.reuse_stats()
        return dataclasses.replace(
            scheduler.stats(),
            prefix_cache_bytes=reuse.idle_tokens * model.kv_bytes_per_token + reuse.host_bytes,
            prefix_cache_entries=reuse.idle_sequences + reuse.host_sequences,
            prefix_reused_tokens=reuse.reused_tokens,
            prefix_read_tokens=reuse.read_tokens,
            prefix_evictions=reuse.evictions,
        )

    async def aclose(self) -> None:
        """Stop every generation, wait for the worker, free the context and the model."""
        self._closed = True
        scheduler, self._scheduler = self._scheduler, None
        model, self._model = self._model, None
        if scheduler is not None:
            scheduler.close()
            with trio.CancelScope(shield=True):
                ended = await trio.to_thread.run_sync(scheduler.join, STOP_TIMEOUT_S)
            if not ended:
                # A step still runs in the library: freeing under it would crash the
                # process; leaking it until exit does not.
                return
        if model is not None:
            model.handle.free()

    # -- internals ----------------------------------------------------------------------------

    def _loaded(self) -> LoadedModel:
        if self._model is None:
            raise BackendError("the model is not loaded")
        return self._model

    @asynccontextmanager
    async def _generate(
        self,
        prompt_ids: Sequence[int],
        max_new_tokens: int,
        sampling: SamplingOptions,
        tenant_id: str | None,
        adapter: str = BASE,
    ) -> AsyncIterator[AsyncIterator[Sequence[int]]]:
        scheduler, relay = self._scheduler, self._relay
        if self._closed:
            raise BackendError("the backend is closed")
        if scheduler is None or relay is None:
            raise BackendError("the model is not loaded")
        if not prompt_ids:
            raise BackendError("the prompt has no tokens")
        if max_new_tokens <= 0:
            yield _empty_stream()
            return
        item = BatchItem(
            prompt_ids,
            max_new_tokens,
            sampling,
            arrived_at=trio.current_time(),
            relay=relay,
            tenant_id=tenant_id,
        )
        scheduler.submit(item, adapter)
        try:
            yield item.stream()
        finally:
            scheduler.withdraw(item)


async def _empty_stream() -> AsyncIterator[Sequence[int]]:
    return
    yield


def reuse_options(model: LoadedModel, cache_sequences: int) -> ReuseOptions:
    """Prefix reuse as the settings ask: the budget in KV cells of this model."""
    budget_bytes = int(model.prefix_cache_mb * 1024 * 1024)
    return ReuseOptions(
        model=model.info.model_name,
        budget_tokens=budget_bytes // max(1, model.kv_bytes_per_token),
        cache_sequences=cache_sequences,
        isolate_tenants=model.prefix_isolation == "tenant",
        bytes_per_token=model.kv_bytes_per_token,
    )


def create_backend(settings: AppSettings) -> LlamaCppBackend:
    """The `llama_cpp` entry point: the configured GGUF (loaded by `load()`)."""
    from llm_local.backends.llama_cpp.loader import plan_from_settings

    return LlamaCppBackend(lambda: plan_from_settings(settings))
