"""The transformers backend: the unconverted model, decoded by continuous batching.

Every request joins transformers' `ContinuousBatchingManager` the moment it arrives and
leaves it the step it ends: at every step the manager's generation thread decodes one
token for each running request and prefills the next chunk of newcomers' prompts. A
request whose consumer leaves is cancelled in the manager, which frees its place before
the next step. Tokens come back through `relay.TokenRelay` (one crossing into trio per
step, as the ct2 backend does).

Prefix reuse (`prefix.PrefixReuse`): the manager's paged cache keeps finished requests'
complete pages and shares them with later prompts that start with the same tokens (a
call's next turn), within the request's namespace, under `prefix_cache_mb`.

Sampling: the manager is built sampling, with transformers' per-request temperature,
top-k and top-p processors, so that greedy and sampled requests share one batch: a greedy
request is sampled with top-k 1 (the most likely token, always), a top-k of 0 ("no cut")
becomes the vocabulary size. A repetition penalty and per-request seeds cannot be honoured
per request (`loader.TRANSFORMERS_SAMPLING`): validation refuses them before admission.

Structured output: a constrained request's grammar state joins `constrained.GrammarMasks`,
which the manager runs as its first logits processor (see there).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import trio

from llm_local.backends.base import BackendError, BackendStats, ModelInfo
from llm_local.backends.hf_tokenizer import HFTokenizer
from llm_local.backends.shared.bridge import BatchItem, WakeupRelay
from llm_local.backends.shared.grammar import TokenMask
from llm_local.backends.transformers import constrained
from llm_local.backends.transformers.adapters import cb_overrides
from llm_local.backends.transformers.loader import (
    LoadedModel,
    LoadPlan,
    load_model,
    plan_from_settings,
)
from llm_local.backends.transformers.prefix import PrefixReuse, resolve_page_tokens
from llm_local.backends.transformers.relay import TokenRelay, make_output_router
from llm_local.core.types import NO_HINTS, GenerationHints, SamplingOptions

if TYPE_CHECKING:
    from llm_local.settings.schema import AppSettings, TransformersSettings

# Placeholders the manager needs to build its per-request processors (one is only built
# for a value that changes something); every request passes its own values.
_PROCESSOR_PLACEHOLDERS = {"temperature": 0.5, "top_k": 50, "top_p": 0.9}
STOP_TIMEOUT_S = 30.0

log = logging.getLogger("llm_local.backends.transformers")


class TransformersBackend:
    """`Backend` over a transformers model and its continuous batching manager."""

    def __init__(self, plan: Callable[[], LoadPlan], options: TransformersSettings) -> None:
        """`plan` runs on the loading thread (it resolves the source and the device)."""
        self._plan = plan
        self._options = options
        self._model: LoadedModel | None = None
        self._manager: Any = None
        self._relay = TokenRelay()
        self._masks: constrained.GrammarMasks | None = None
        self._prefix = PrefixReuse(
            int(options.prefix_cache_mb * 2**20), on_match=self._relay.note_cached
        )
        self._wakeups: WakeupRelay | None = None
        self._request_ids = itertools.count()
        self._closed = False

    # -- Backend protocol -------------------------------------------------------------------

    @property
    def info(self) -> ModelInfo:
        return self._loaded().info

    @property
    def tokenizer(self) -> HFTokenizer:
        return self._loaded().tokenizer

    async def load(self) -> None:
        if self._manager is not None:
            raise RuntimeError("the backend is already loaded")
        if self._closed:
            raise RuntimeError("the backend is closed")
        # On a thread: loading takes seconds to minutes; health answers meanwhile.
        loaded = await trio.to_thread.run_sync(lambda: load_model(self._plan()))
        if self._closed:
            raise RuntimeError("the backend was closed while loading")
        self._wakeups = WakeupRelay(trio.lowlevel.current_trio_token())
        # On the trio thread, with no checkpoint until it is stored: the manager starts its
        # generation thread (a non-daemon thread that only aclose() stops) and builds its
        # KV cache there; building it here takes milliseconds.
        self._manager = self._start_manager(loaded)
        self._model = loaded

    def generate(
        self,
        prompt_ids: Sequence[int],
        max_new_tokens: int,
        sampling: SamplingOptions,
        hints: GenerationHints = NO_HINTS,
    ) -> AbstractAsyncContextManager[AsyncIterator[Sequence[int]]]:
        # The manager schedules first come, first served; the tenant only keys its pages,
        # the adapter is the one the request decodes with.
        tenant = hints.tenant_id if self._options.prefix_isolation == "tenant" else None
        return self._generate(prompt_ids, max_new_tokens, sampling, hints.adapter, tenant)

    def stats(self) -> BackendStats:
        """Read from the manager's own scheduler: a cancelled request stops counting as
        running the step the manager drops it, not when its consumer leaves."""
        manager = self._manager
        processor = None if manager is None else manager.batch_processor
        prefix = self._prefix.counters
        if processor is None:
            running = queued = 0
        else:
            scheduler = processor.scheduler
            running = len(scheduler.active_requests)
            queued = len(scheduler.waiting_requests) + manager.input_queue.qsize()
        return BackendStats(
            running=running,
            queued=queued,
            batches=1 if running else 0,
            prefix_cache_bytes=prefix.kept_bytes,
            prefix_cache_entries=prefix.kept_pages,
            prefix_reused_tokens=prefix.reused_tokens,
            prefix_read_tokens=prefix.read_tokens,
            prefix_evictions=prefix.evicted_pages,
        )

    async def aclose(self) -> None:
        """Stop the generation thread (requests still running fail), release the model."""
        self._closed = True
        manager, self._manager = self._manager, None
        self._relay.fail_all(BackendError("the backend is closing"))
        if manager is not None:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(_stop_manager, manager)
        if self._masks is not None:
            self._masks.close()
        if self._model is not None and self._model.adapters is not None:
            self._model.adapters.close()
        self._model = None

    # -- internals ----------------------------------------------------------------------------

    def _loaded(self) -> LoadedModel:
        if self._model is None:
            raise BackendError("the model is not loaded")
        return self._model

    def _start_manager(self, loaded: LoadedModel) -> Any:
        from transformers import ContinuousBatchingConfig, GenerationConfig

        options = self._options
        end_ids = sorted(loaded.tokenizer.end_token_ids)
        generation = GenerationConfig(
            do_sample=True,
            **_PROCESSOR_PLACEHOLDERS,
            eos_token_id=end_ids or None,
            pad_token_id=end_ids[0] if end_ids else None,
        )
        cache_tokens = options.kv_cache_tokens
        page_size = resolve_page_tokens(options.page_tokens, options.attn_implementation)
        batching = ContinuousBatchingConfig(
            per_request_processors=True,
            # Never switch attention behind the settings' back.
            auto_switch_to_flash=False,
            max_requests_per_batch=options.max_requests_per_batch,
            max_batch_tokens=options.max_batch_tokens or None,
            page_size=page_size,
            num_blocks=-(-cache_tokens // page_size) if cache_tokens else None,
            **{
                "allow_block_sharing": options.prefix_cache_mb > 0,
                # Adapters turn sharing off: a shared block would carry one adapter's keys.
                **cb_overrides(loaded.info.adapters or ()),
            },
        )
        manager = loaded.model.init_continuous_batching(
            generation_config=generation, continuous_batching_config=batching
        )
        manager.output_router = make_output_router(self._relay)
        self._setup_structured_output(loaded, manager)
        if loaded.adapters is not None:
            loaded.adapters.bind(manager)
        _hook_cache_creation(manager, self._prefix)
        manager.start()
        return manager

    def _setup_structured_output(self, loaded: LoadedModel, manager: Any) -> None:
        """Masks as the manager's first logits processor, where its batching lets them
        see every step (constrained.supports_masks); elsewhere structure is refused."""
        if loaded.grammar is None:
            return
        if not constrained.supports_masks(manager):
            log.warning(
                "structured output is off: transformers' continuous batching runs "
                "asynchronously, with accelerator graphs or compiled here, so no logits "
                "processor of ours can see each step"
            )
            loaded.grammar = None
            sampling = replace(loaded.info.sampling, constraints=None)
            loaded.info = replace(loaded.info, sampling=sampling)
            return
        self._masks = constrained.GrammarMasks(self._grammar_failed)
        constrained.install(manager, self._masks)

    def _grammar_failed(self, request_id: str, why: str) -> None:
        """On the generation thread: a grammar rejected a token (a bug, or an end token
        where the grammar is complete): the request fails and leaves the batch."""
        self._relay.fail(request_id, BackendError(f"structured output: {why}"))
        manager = self._manager
        if manager is not None:
            manager.cancel_request(request_id)

    @asynccontextmanager
    async def _generate(
        self,
        prompt_ids: Sequence[int],
        max_new_tokens: int,
        sampling: SamplingOptions,
        adapter: str | None,
        tenant: str | None,
    ) -> AsyncIterator[AsyncIterator[Sequence[int]]]:
        manager, wakeups = self._manager, self._wakeups
        if self._closed:
            raise BackendError("the backend is closed")
        if manager is None or wakeups is None:
            raise BackendError("the model is not loaded")
        if not prompt_ids:
            raise BackendError("the prompt has no tokens")
        if max_new_tokens <= 0:
            yield _empty_stream()
            return
        item = BatchItem(
            prompt_ids, max_new_tokens, sampling, arrived_at=trio.current_time(), relay=wakeups
        )
        request_id = f"llm-local-{next(self._request_ids)}"
        mask = await self._grammar_state(sampling)
        adapters = self._loaded().adapters
        if adapter is not None and (adapters is None or adapter not in adapters.adapters):
            raise BackendError(f"unknown LoRA adapter {adapter!r}")
        self._relay.track(request_id, item)
        if mask is not None:
            assert self._masks is not None  # _grammar_state found a grammar, hence masks
            self._masks.track(request_id, mask)
        if adapters is not None:
            adapters.assign(request_id, adapter)  # before the manager may schedule it
        self._prefix.register(request_id, tenant)
        try:
            accepted = manager.add_request(
                list(prompt_ids),
                request_id=request_id,
                max_new_tokens=max_new_tokens,
                streaming=True,
                eos_token_id=sorted(self.tokenizer.end_token_ids) or None,
                **processor_values(sampling, self.tokenizer.vocab_size),
            )
            if accepted is None:
                status = manager.background_thread_status
                why = status.fatal_error or "it is stopping"
                raise BackendError(f"transformers' generation loop takes no requests: {why}")
            yield item.stream()
        finally:
            self._relay.forget(request_id)
            if self._masks is not None:
                self._masks.forget(request_id)
            self._prefix.release(request_id)
            if item.active:  # the consumer left before the end: free its place now
                item.cancel()
                manager.cancel_request(request_id)
            if adapters is not None:
                # A cancelled request still in this step's batch decodes as the base
                # model from here on: its tokens go nowhere.
                adapters.release(request_id)

    async def _grammar_state(self, sampling: SamplingOptions) -> TokenMask | None:
        """A fresh matcher for a constrained request, made on a worker thread: llguidance
        builds its parser from the grammar then (milliseconds for a large schema)."""
        constraint = sampling.constraint
        if constraint is None:
            return None
        compiler = self._loaded().grammar
        if compiler is None or self._masks is None:
            # Validation refuses structure before admission here: only a bug gets here.
            raise BackendError("structured output is not available on this backend")
        try:
            return await trio.to_thread.run_sync(compiler.matcher, constraint)
        except ValueError as exc:
            raise BackendError(f"structured output: {exc}") from exc


def processor_values(sampling: SamplingOptions, vocab_size: int) -> dict[str, Any]:
    """The per-request values of the manager's temperature, top-k and top-p processors."""
    if sampling.greedy:
        # Only the most likely token survives top-k 1: sampling it is greedy decoding.
        return {"temperature": 1.0, "top_k": 1, "top_p": 1.0}
    return {
        "temperature": float(sampling.temperature),
        "top_k": sampling.top_k or vocab_size,  # 0: no cut
        "top_p": float(sampling.top_p),
    }


def _hook_cache_creation(manager: Any, prefix: PrefixReuse) -> None:
    """Install `prefix`'s hooks on the paged cache the manager builds on its generation
    thread, before that thread schedules anything."""
    create = manager._create_batch_processor

    def create_hooked() -> Any:
        processor = create()
        prefix.install(processor.cache)
        return processor

    manager._create_batch_processor = create_hooked


def _stop_manager(manager: Any) -> None:
    # A hard stop: a flushing stop would first decode whatever is still running to its end.
    manager.stop(block=True, timeout=STOP_TIMEOUT_S, hard_stop=True)
    manager.destroy()


async def _empty_stream() -> AsyncIterator[Sequence[int]]:
    return
    yield


def create_backend(settings: AppSettings) -> TransformersBackend:
    """The `transformers` entry point: the configured model, unconverted (loaded by `load()`)."""
    return TransformersBackend(lambda: plan_from_settings(settings), settings.transformers)
