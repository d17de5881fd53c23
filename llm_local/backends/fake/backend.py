"""A deterministic backend without a model, for unit tests of core and transports.

It answers "Echo: <last user message>" (or a configured reply), then the end-of-turn
token, in groups of `group_size` ids, sleeping `token_delay_s` per token. It can be
told to load slowly, to fail loading, and to fail mid-generation, so transport tests
can exercise loading, capacity, cancellation and errors. Never used by end-to-end
tests or benchmarks.

Settings (``[fake]`` table, all optional): token_delay_s, load_delay_s, group_size,
reply (``{prompt}`` stands for the last user message), fail_load (true, a reason, or
the number of load attempts that fail before one succeeds), fail_after_tokens,
context_limit, model_name.
"""

from __future__ import annotations

import math
import re
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, fields

import trio

from llm_local.backends.base import (
    BackendError,
    BackendLoadError,
    BackendStats,
    ModelInfo,
)
from llm_local.backends.fake.tokenizer import IM_END, IM_START, FakeTokenizer
from llm_local.core.types import NO_HINTS, GenerationHints, SamplingOptions

DEFAULT_REPLY = "Echo: {prompt}"
_CHATML_USER = re.compile(r"<\|im_start\|>user\n(.*?)<\|im_end\|>", re.DOTALL)
_PLAIN_USER = re.compile(r"(?:^|\n)User: (.*?)\nAssistant:", re.DOTALL)


@dataclass(frozen=True, slots=True)
class FakeConfig:
    token_delay_s: float = 0.0
    load_delay_s: float = 0.0
    group_size: int = 4
    reply: str = DEFAULT_REPLY
    load_failures: float = 0  # load attempts that fail before one succeeds; math.inf: all
    load_failure_reason: str = "fake backend told to fail loading"
    fail_after_tokens: int | None = None  # raise BackendError after this many tokens
    context_limit: int = 2048
    model_name: str = "fake"
    # Whether its tokenizer configuration asks for a BOS before a plain prompt (as Llama
    # 3's and Phi-3's do); its BOS is its bos_token, <|im_start|>.
    plain_prompt_bos: bool = False

    def __post_init__(self) -> None:
        if self.group_size < 1:
            raise ValueError(f"fake.group_size must be at least 1, got {self.group_size}")
        if self.context_limit < 1:
            raise ValueError(f"fake.context_limit must be at least 1, got {self.context_limit}")
        for name in ("token_delay_s", "load_delay_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"fake.{name} must be a number >= 0, got {value}")

    @classmethod
    def from_mapping(cls, raw: Mapping[str, object]) -> FakeConfig:
        """From the ``[fake]`` settings table (keys case-insensitive)."""
        values = {str(key).lower(): value for key, value in raw.items()}
        known = {f.name for f in fields(cls)} - {"load_failures", "load_failure_reason"}
        unknown = set(values) - known - {"fail_load"}
        if unknown:
            raise ValueError(f"unknown fake backend settings: {', '.join(sorted(unknown))}")
        kwargs: dict[str, object] = {key: values[key] for key in known & set(values)}
        fail_load = values.get("fail_load", False)
        if isinstance(fail_load, bool):
            kwargs["load_failures"] = math.inf if fail_load else 0
        elif isinstance(fail_load, int):
            kwargs["load_failures"] = fail_load
        elif isinstance(fail_load, str):
            kwargs["load_failures"] = math.inf if fail_load else 0
            kwargs["load_failure_reason"] = fail_load
        else:
            raise ValueError(f"fake.fail_load must be a bool, a count or a reason: {fail_load!r}")
        return cls(**kwargs)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class FakeCall:
    """What one generate() call received (transport tests check parameters with it)."""

    prompt_ids: tuple[int, ...]
    max_new_tokens: int
    sampling: SamplingOptions
    hints: GenerationHints = NO_HINTS


class FakeBackend:
    """Implements the Backend protocol."""

    def __init__(self, config: FakeConfig | None = None) -> None:
        self.config = config or FakeConfig()
        self._tokenizer = FakeTokenizer(IM_START if self.config.plain_prompt_bos else None)
        self._info = ModelInfo(
            backend="fake",
            model_name=self.config.model_name,
            device="cpu",
            compute_type="float32",
            context_limit=self.config.context_limit,
        )
        self._load_attempts = 0
        self._loaded = False
        self._closed = False
        self._running = 0
        self.calls: list[FakeCall] = []

    @property
    def info(self) -> ModelInfo:
        return self._info

    @property
    def tokenizer(self) -> FakeTokenizer:
        return self._tokenizer

    @property
    def loaded(self) -> bool:
        return self._loaded

    async def load(self) -> None:
        self._load_attempts += 1
        await trio.sleep(self.config.load_delay_s)
        if self._load_attempts <= self.config.load_failures:
            raise BackendLoadError(self.config.load_failure_reason)
        self._loaded = True

    def generate(
        self,
        prompt_ids: Sequence[int],
        max_new_tokens: int,
        sampling: SamplingOptions,
        hints: GenerationHints = NO_HINTS,
    ) -> AbstractAsyncContextManager[AsyncIterator[Sequence[int]]]:
        return self._generate(tuple(prompt_ids), max_new_tokens, sampling, hints)

    @asynccontextmanager
    async def _generate(
        self,
        prompt_ids: tuple[int, ...],
        max_new_tokens: int,
        sampling: SamplingOptions,
        hints: GenerationHints,
    ) -> AsyncIterator[AsyncIterator[Sequence[int]]]:
        if self._closed:
            raise BackendError("backend is closed")
        if not self._loaded:
            raise BackendError("model is not loaded")
        if max_new_tokens < 1:
            raise BackendError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        self.calls.append(FakeCall(prompt_ids, max_new_tokens, sampling, hints))
        answer = self.answer_ids(prompt_ids)[:max_new_tokens]
        stream = _FakeStream(self, answer)
        self._running += 1
        try:
            yield stream
        finally:
            stream.stopped = True
            self._running -= 1

    def answer_ids(self, prompt_ids: Sequence[int]) -> list[int]:
        """Every id the fake would generate for this prompt, end token included."""
        prompt = _last_user_message(self._tokenizer.decode_with_specials(prompt_ids))
        reply = self.config.reply.replace("{prompt}", prompt)
        return [*self._tokenizer.encode(reply), IM_END]

    def stats(self) -> BackendStats:
        return BackendStats(running=self._running, queued=0, batches=self._running)

    async def aclose(self) -> None:
        self._closed = True
        self._loaded = False
        await trio.lowlevel.checkpoint()

    @property
    def closed(self) -> bool:
        return self._closed


class _FakeStream:
    """The ids of one answer, delivered in groups with the configured delay."""

    def __init__(self, backend: FakeBackend, ids: list[int]) -> None:
        self._backend = backend
        self._ids = ids
        self._position = 0
        self.stopped = False

    def __aiter__(self) -> _FakeStream:
        return self

    async def __anext__(self) -> Sequence[int]:
        config = self._backend.config
        if self.stopped or self._position >= len(self._ids):
            await trio.lowlevel.checkpoint()
            raise StopAsyncIteration
        if self._backend.closed:
            raise BackendError("backend closed during generation")
        end = min(self._position + config.group_size, len(self._ids))
        failing_at = config.fail_after_tokens
        if failing_at is not None:
            if self._position >= failing_at:
                await trio.lowlevel.checkpoint()
                raise BackendError(f"fake backend failed after {failing_at} tokens")
            end = min(end, failing_at)
        group = self._ids[self._position : end]
        if config.token_delay_s > 0:
            await trio.sleep(config.token_delay_s * len(group))
        else:
            await trio.lowlevel.checkpoint()
        self._position = end
        return group


def _last_user_message(prompt: str) -> str:
    for pattern in (_CHATML_USER, _PLAIN_USER):
        matches = pattern.findall(prompt)
        if matches:
            return str(matches[-1])
    return prompt.strip()
