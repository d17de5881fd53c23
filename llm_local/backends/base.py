"""The Backend protocol every model backend implements, and the registry that finds them.

Backends are plugins: a backend is an entry point in the group ``llm_local.backends``
whose object is a factory ``(AppSettings) -> Backend``. Settings name the backend
(``backend = "ct2"``); swapping it is a settings change and nothing else.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from llm_local.core.numerics import NumericsStatus
from llm_local.core.types import (
    FULL_SAMPLING_SUPPORT,
    NO_HINTS,
    GenerationHints,
    SamplingOptions,
    SamplingSupport,
)

if TYPE_CHECKING:
    from llm_local.settings.schema import AppSettings

ENTRY_POINT_GROUP = "llm_local.backends"


class BackendError(Exception):
    """A generation failed inside the backend (reported as finish reason ``error``)."""


class BackendLoadError(Exception):
    """The model could not be loaded; the message says what and why."""

    # False when loading again cannot help (the numerics check is deterministic).
    retryable = True


class NumericsRejected(BackendLoadError):
    """The compute type does not compute what the unquantized model computes."""

    retryable = False


@runtime_checkable
class ModelTokenizer(Protocol):
    """What core needs from a tokenizer: ids in, text out, and the chat template."""

    @property
    def end_token_ids(self) -> frozenset[int]:
        """Ids that end the assistant's turn (eos, <|im_end|>, <|eot_id|>, ...)."""
        ...

    @property
    def chat_template(self) -> str | None:
        """The model's Jinja chat template, or None when it has none."""
        ...

    @property
    def special_tokens(self) -> dict[str, str]:
        """Names the template may use: bos_token, eos_token, ... -> their text."""
        ...

    @property
    def plain_prompt_bos_id(self) -> int | None:
        """The id a plain prompt (a text completion: no chat template) starts with,
        when the model's tokenizer configuration asks for one (``add_bos_token`` in
        tokenizer_config.json or the GGUF's ``tokenizer.ggml.add_bos_token``, or a
        post-processor that adds it); None when it asks for none. Core adds it once
        (core.prompt.with_bos); a chat prompt gets its BOS from its template instead."""
        ...

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; special tokens spelled in the text become their ids,
        nothing is added around it (the chat template already placed bos etc.)."""
        ...

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`, special tokens skipped."""
        ...


@dataclass(frozen=True, slots=True)
class ModelInfo:
    backend: str
    model_name: str
    device: str  # "cpu" or "cuda:N"
    compute_type: str  # what the device really runs, e.g. "int8" or "float16"
    context_limit: int  # prompt + completion tokens the model can hold
    numerics: NumericsStatus | None = None  # None: the backend does not check numerics
    threads: tuple[int, int] | None = None  # (workers, threads per worker), when known
    # The sampling options it honours: validation refuses the rest before admission.
    sampling: SamplingSupport = FULL_SAMPLING_SUPPORT
    # The LoRA adapters a request may name ([adapters], loaded); None: this backend cannot
    # apply adapters at all (validation refuses lora_adapter_id by name).
    adapters: tuple[str, ...] | None = None
    # Each adapter's numerics verdict (the check at load with it applied), where the
    # backend checks adapters (llama_cpp); /health and /config report it beside the model's.
    adapter_numerics: tuple[tuple[str, NumericsStatus], ...] = ()


@dataclass(frozen=True, slots=True)
class BackendStats:
    running: int  # generations decoding now
    queued: int  # generations waiting for a batch slot
    batches: int  # batches decoding now
    # How a batching backend schedules (None / 0 where it does not): its decisions so far,
    # the wait for a worker it expected last, and what it measured decoding to cost.
    merges: int = 0  # running batches restarted to take waiting requests in
    lanes_opened: int = 0  # batches started on an extra lane, the workers all busy
    expected_wait_seconds: float = 0.0
    step_seconds: float | None = None  # one decoding step of a batch of one
    step_seconds_per_item: float | None = None  # what each further item adds to a step
    prefill_token_seconds: float | None = None  # one prompt token read
    prefix_cache_bytes: int = 0  # shared prompt prefixes the backend keeps cached
    prefix_cache_entries: int = 0
    # Conversation prefix reuse (a backend without it leaves them 0): prompt tokens not
    # read because cached state held them, prompt tokens read, cached prefixes evicted.
    prefix_reused_tokens: int = 0
    prefix_read_tokens: int = 0
    prefix_evictions: int = 0


@runtime_checkable
class ReportsCachedTokens(Protocol):
    """A generation stream that can say how many prompt tokens came from a cache; core
    reads it once the stream ended (OpenAI's ``usage.prompt_tokens_details``)."""

    @property
    def cached_tokens(self) -> int: ...


class Backend(Protocol):
    """A model that turns prompt token ids into generated token ids.

    Lifecycle: ``await load()`` (may take minutes; blocking work runs off the event
    loop), then ``generate`` any number of times concurrently, then ``await aclose()``.
    """

    @property
    def info(self) -> ModelInfo:
        """Valid after load()."""
        ...

    @property
    def tokenizer(self) -> ModelTokenizer:
        """Valid after load()."""
        ...

    async def load(self) -> None:
        """Load the model; raises BackendLoadError with a one-line reason."""
        ...

    def generate(
        self,
        prompt_ids: Sequence[int],
        max_new_tokens: int,
        sampling: SamplingOptions,
        hints: GenerationHints = NO_HINTS,
    ) -> AbstractAsyncContextManager[AsyncIterator[Sequence[int]]]:
        """Stream generated token ids in groups (whatever is ready at each wake-up).

        `hints` (tenant, shared prompt prefix) may guide scheduling and caching; the
        tokens generated must not depend on them, except on `hints.adapter`: the LoRA
        adapter to apply, always one of `info.adapters` (validated in core).

        The stream ends after `max_new_tokens` ids or after an end token, which is
        yielded too. Leaving the context (normally, by an exception or by
        cancellation) stops decoding of this request within one step and frees its
        batch slot. Raises BackendError if generation fails.
        """
        ...

    def stats(self) -> BackendStats: ...

    async def aclose(self) -> None:
        """Stop every generation and release the model."""
        ...


BackendFactory = Callable[["AppSettings"], Backend]


class UnknownBackendError(LookupError):
    pass


def available_backends() -> list[str]:
    return sorted(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))


def load_backend_factory(name: str) -> BackendFactory:
    """The factory registered under `name` in the ``llm_local.backends`` group."""
    for ep in entry_points(group=ENTRY_POINT_GROUP, name=name):
        factory: BackendFactory = ep.load()
        return factory
    raise UnknownBackendError(
        f"unknown backend {name!r}; installed backends: {', '.join(available_backends())}"
    )


def create_backend(settings: AppSettings) -> Backend:
    return load_backend_factory(settings.backend)(settings)
