"""The CTranslate2 backend: a converted model served through the batching scheduler.

`create_backend(settings)` is the plugin entry point; `CT2Backend.from_directory` builds
one without the settings machinery (tests, benchmarks, scripts). See `decode.py` for how
sampling options and seeds behave, `scheduler.py` and `grouping.py` for batching.
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import math
import time
import weakref
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from llm_local.backends.base import BackendError, BackendStats, ModelInfo
from llm_local.backends.ct2.decode import make_batch_executor
from llm_local.backends.ct2.loader import LoadedModel, LoadPlan, load_model, plan_from_settings
from llm_local.backends.ct2.prefix_cache import PrefixCachePolicy, release_freed_memory
from llm_local.backends.ct2.scheduler import BatchScheduler, BatchStarted
from llm_local.backends.hf_tokenizer import HFTokenizer
from llm_local.backends.shared.bridge import BatchItem
from llm_local.backends.shared.costs import CostModel
from llm_local.core.types import NO_HINTS, GenerationHints, SamplingOptions

if TYPE_CHECKING:
    import ctranslate2

    from llm_local.settings.schema import AppSettings

log = logging.getLogger(__name__)

DEFAULT_MAX_QUEUED = 256
DEFAULT_PREFIX_CACHE_MB = 512.0
# When the model's layer shapes cannot be read: a generous guess for a small model.
FALLBACK_KV_BYTES_PER_TOKEN = 256 * 1024
# generate_batch returns before CTranslate2's worker thread has quite finished with the
# batch (num_active_batches drops a moment later: up to ~20 ms measured on a busy
# machine). Closing waits that long, at most this, before releasing the model.
IDLE_WAIT_S = 5.0


@dataclass(frozen=True, slots=True)
class BatchingOptions:
    """How the scheduler forms batches (see grouping.py for the rules).

    At most `max_batch_size` generations per batch; a lone request on an idle server
    waits `batch_wait_ms` for company, `busy_batch_wait_ms` while a batch decodes (None:
    `batch_wait_ms`); `max_queued` bounds the queue (a full queue makes `generate` wait);
    `min_split_size` and `max_prompt_spread` decide when idle workers split a batch.
    When every worker is busy, waiting requests may restart a running batch with it or,
    past `ttft_target_ms` (0: never), start on an extra lane (one more replica than the
    workers; grouping.plan_relief). Shared system prompts are cached by CTranslate2 within
    `prefix_cache_mb` (0: never cached; prefix_cache.py).
    """

    max_batch_size: int = 32
    batch_wait_ms: float = 2.0
    busy_batch_wait_ms: float | None = None
    max_queued: int = DEFAULT_MAX_QUEUED
    min_split_size: int = 2
    max_prompt_spread: int = 32
    ttft_target_ms: float = 0.0
    prefix_cache_mb: float = DEFAULT_PREFIX_CACHE_MB

    @property
    def extra_lanes(self) -> int:
        """Replicas beside the workers, for lanes: one when there is a TTFT target."""
        return 1 if self.ttft_target_ms > 0 else 0


# Backends holding a model they loaded. A CTranslate2 Generator still alive when the
# interpreter finalizes aborts the process ("terminate called without an active
# exception", FINDINGS); aclose() releases it, and this catches backends never closed.
_backends_with_models: weakref.WeakSet[CT2Backend] = weakref.WeakSet()


@atexit.register
def _release_models_at_exit() -> None:
    for backend in list(_backends_with_models):
        model = backend._model
        deadline = time.monotonic() + IDLE_WAIT_S
        while model is not None and _busy(model.generator) and time.monotonic() < deadline:
            time.sleep(0.001)
        backend._release_model()


class CT2Backend:
    """`Backend` over a CTranslate2 Generator: load, generate concurrently, close."""

    def __init__(
        self,
        plan: Callable[[], LoadPlan],
        *,
        batching: BatchingOptions = BatchingOptions(),
        on_batch: Callable[[BatchStarted], None] | None = None,
        preloaded: LoadedModel | None = None,
        costs: CostModel | None = None,
    ) -> None:
        """`plan` runs on the loading thread (it may look for the model on disk);
        `on_batch` observes every batch start; `costs` measures what decoding costs
        (a fresh CostModel: tests may pass one that ignores measurements).

        `preloaded` skips loading and leaves the model to its owner: `aclose` then
        does not unload it (tests share one loaded model between trio runs).
        """
        self._plan = plan
        self._batching = batching
        self._on_batch = on_batch
        self._model: LoadedModel | None = preloaded
        self._owns_model = preloaded is None
        self._scheduler: BatchScheduler | None = None
        self._closed = False
        self._costs = costs or CostModel()
        self._prefixes = PrefixCachePolicy(budget_bytes=0, bytes_per_token=1)  # until load

    @classmethod
    def from_directory(
        cls,
        model_dir: Path | str,
        *,
        device: str = "cpu",
        device_index: int = 0,
        compute_type: str = "int8",
        inter_threads: int = 2,
        intra_threads: int = 1,
        model_name: str | None = None,
        context_limit: int = 0,
        batching: BatchingOptions = BatchingOptions(),
        on_batch: Callable[[BatchStarted], None] | None = None,
    ) -> CT2Backend:
        directory = Path(model_dir)
        plan = LoadPlan(
            model_dir=directory,
            model_name=model_name or directory.name,
            device=device,
            device_index=device_index,
            compute_type=compute_type,
            inter_threads=inter_threads,
            intra_threads=intra_threads,
            context_limit=context_limit,
            extra_lanes=batching.extra_lanes,
        )
        return cls(lambda: plan, batching=batching, on_batch=on_batch)

    @classmethod
    def from_loaded(
        cls,
        model: LoadedModel,
        *,
        batching: BatchingOptions = BatchingOptions(),
        on_batch: Callable[[BatchStarted], None] | None = None,
        costs: CostModel | None = None,
    ) -> CT2Backend:
        """A backend over a model its caller loaded (`loader.load_model`) and releases."""

        def no_plan() -> LoadPlan:
            raise AssertionError("a preloaded backend has nothing to plan")

        return cls(no_plan, batching=batching, on_batch=on_batch, preloaded=model, costs=costs)

    # -- Backend protocol -------------------------------------------------------------------

    @property
    def info(self) -> ModelInfo:
        return self._loaded().info

    @property
    def tokenizer(self) -> HFTokenizer:
        return self._loaded().tokenizer

    @property
    def generator(self) -> ctranslate2.Generator:
        """The CTranslate2 Generator (tests read `num_active_batches` from it)."""
        return self._loaded().generator

    async def load(self) -> None:
        if self._scheduler is not None:
            raise RuntimeError("the backend is already loaded")
        if self._closed:
            raise RuntimeError("the backend is closed")
        if self._model is None:
            # On a thread: loading takes seconds to minutes and the event loop keeps
            # serving health checks meanwhile.
            self._model = await trio.to_thread.run_sync(self._load_blocking)
            _backends_with_models.add(self)
        self._scheduler = self._make_scheduler(self._model)
        self._scheduler.start()

    def generate(
        self,
        prompt_ids: Sequence[int],
        max_new_tokens: int,
        sampling: SamplingOptions,
        hints: GenerationHints = NO_HINTS,
    ) -> AbstractAsyncContextManager[AsyncIterator[Sequence[int]]]:
        # The tenant orders the waiting list (tenants take turns, core/fairness.py).
        return self._generate(
            prompt_ids,
            max_new_tokens,
            sampling,
            hints.tenant_id,
            self._static_prefix(prompt_ids, hints),
        )

    def _static_prefix(self, prompt_ids: Sequence[int], hints: GenerationHints) -> Sequence[int]:
        """The leading ids to pass as a static prompt: the shared prefix the hints name,
        when reading it costs more than a decoding step (what keeping it apart from
        requests with other prefixes may cost: a batch of its own); none when the prefix
        cache is off."""
        length = min(hints.shared_prefix_length, len(prompt_ids) - 1)
        if length <= 0 or self._batching.prefix_cache_mb <= 0:
            return ()
        costs = self._costs.estimate()
        if costs.prefill_s(length) < costs.step_s(1):
            return ()
        return prompt_ids[:length]

    def stats(self) -> BackendStats:
        if self._scheduler is None:
            return BackendStats(running=0, queued=0, batches=0)
        stats = self._scheduler.stats()
        costs = self._costs.estimate()
        return dataclasses.replace(
            stats,
            step_seconds=costs.step_s(1),
            step_seconds_per_item=costs.step_per_item_s,
            prefill_token_seconds=costs.prefill_token_s,
            prefix_cache_bytes=self._prefixes.cached_bytes,
            prefix_cache_entries=self._prefixes.cached_prefixes,
        )

    async def aclose(self) -> None:
        """Stop every generation, wait for the worker threads, release the model."""
        self._closed = True
        scheduler = self._scheduler
        if scheduler is not None:
            await scheduler.aclose()
            del scheduler
        if self._model is not None and self._owns_model:
            # Shielded and bounded: the model must not be released under a thread.
            with trio.CancelScope(shield=True), trio.move_on_after(IDLE_WAIT_S):
                while _busy(self._model.generator):  # noqa: ASYNC110 (no event to wait on)
                    await trio.sleep(0.001)
        self._release_model()

    # -- internals ----------------------------------------------------------------------------

    def _release_model(self) -> None:
        """Drop the model now, while the interpreter is fully alive (see above): the last
        reference gone, CTranslate2 joins its worker threads here. Every batch must be
        over (aclose waited for them, or the trio run has ended)."""
        _backends_with_models.discard(self)
        self._scheduler = None  # its batch executor holds the Generator too
        model, self._model = self._model, None
        if model is not None and self._owns_model:
            model.generator.unload_model()
            del model

    def _load_blocking(self) -> LoadedModel:
        return load_model(self._plan())

    def _loaded(self) -> LoadedModel:
        if self._model is None:
            raise BackendError("the model is not loaded")
        return self._model

    def _make_scheduler(self, model: LoadedModel) -> BatchScheduler:
        import ctranslate2

        options = self._batching
        self._prefixes = PrefixCachePolicy(
            budget_bytes=int(options.prefix_cache_mb * 2**20),
            bytes_per_token=model.kv_bytes_per_token or FALLBACK_KV_BYTES_PER_TOKEN,
        )
        execute = make_batch_executor(
            model.generator,
            model.tokenizer,
            model.tokenizer.end_token_ids,
            ctranslate2.set_random_seed,
            costs=self._costs,
            prefixes=self._prefixes,
        )
        busy_wait_ms = options.busy_batch_wait_ms
        replicas = max(1, int(model.generator.num_generators))
        lanes = min(model.lanes, replicas - 1)
        return BatchScheduler(
            execute,
            workers=replicas - lanes,
            max_batch_size=options.max_batch_size,
            batch_wait_s=options.batch_wait_ms / 1000,
            max_queued=options.max_queued,
            min_split_size=options.min_split_size,
            max_prompt_spread=options.max_prompt_spread,
            on_batch=self._on_batch,
            busy_batch_wait_s=None if busy_wait_ms is None else busy_wait_ms / 1000,
            costs=self._costs.estimate,
            ttft_target_s=options.ttft_target_ms / 1000 if options.ttft_target_ms > 0 else math.inf,
            lanes=lanes,
            is_cached=self._prefixes.is_warm,
            maintenance=self._prefix_maintenance,
        )

    def _prefix_maintenance(self) -> Callable[[], None] | None:
        """Work to drop CTranslate2's prefix cache, when the policy wants it (no batch runs)."""
        if not self._prefixes.wants_reset() or self._model is None:
            return None
        generator = self._model.generator
        prefixes = self._prefixes

        def drop_cache() -> None:
            # CTranslate2 never evicts a cached static prompt; reloading the model (from
            # disk, the page cache: ~1 s for a small model) is the only way to drop them
            # (prefix_cache.py). unload_model does nothing while a batch is still winding
            # down, so wait for none first.
            deadline = time.monotonic() + IDLE_WAIT_S
            while _busy(generator) and time.monotonic() < deadline:
                time.sleep(0.001)
            generator.unload_model()
            if generator.model_is_loaded:
                # Still in use: try again once more prefixes have been refused.
                prefixes.postpone_reset()
                return
            generator.load_model()
            release_freed_memory()
            prefixes.reset()
            log.info(
                "dropped the prefix cache (its budget was full of prefixes no longer asked for)"
            )

        return drop_cache

    @asynccontextmanager
    async def _generate(
        self,
        prompt_ids: Sequence[int],
        max_new_tokens: int,
        sampling: SamplingOptions,
        tenant_id: str | None,
        static_prefix: Sequence[int],
    ) -> AsyncIterator[AsyncIterator[Sequence[int]]]:
        scheduler = self._scheduler
        if self._closed:
            raise BackendError("the backend is closed")
        if scheduler is None:
            raise BackendError("the model is not loaded")
        if not prompt_ids:
            raise BackendError("the prompt has no tokens")
        if max_new_tokens <= 0:
            yield _empty_stream()
            return
        assert scheduler.relay is not None  # a loaded backend's scheduler is started
        item = BatchItem(
            prompt_ids,
            max_new_tokens,
            sampling,
            arrived_at=trio.current_time(),
            relay=scheduler.relay,
            tenant_id=tenant_id,
            static_prefix=static_prefix,
        )
        async with scheduler.generation(item) as stream:
            yield stream


async def _empty_stream() -> AsyncIterator[Sequence[int]]:
    return
    yield


def _busy(generator: ctranslate2.Generator) -> bool:
    return bool(generator.num_active_batches or generator.num_queued_batches)


def create_backend(settings: AppSettings) -> CT2Backend:
    """The `ct2` entry point: a backend for the configured model (loaded by `load()`)."""
    runtime = settings.runtime
    batching = BatchingOptions(
        max_batch_size=runtime.max_batch_size,
        batch_wait_ms=runtime.batch_wait_ms,
        busy_batch_wait_ms=runtime.busy_batch_wait_ms,
        ttft_target_ms=runtime.ttft_target_ms,
        prefix_cache_mb=runtime.prefix_cache_mb,
        # Admission already bounds what reaches the backend; this bound only guards
        # against a bug there, so it must never bite first.
        max_queued=max(1, settings.capacity.max_concurrent + settings.capacity.max_queued),
    )
    return CT2Backend(
        lambda: dataclasses.replace(plan_from_settings(settings), extra_lanes=batching.extra_lanes),
        batching=batching,
    )
