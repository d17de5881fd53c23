"""Conversation prefix reuse in the transformers backend, on the real SmolLM2 model through
core's generation: a call's next turn reuses its whole history in whole pages, answers
what it answers without reuse, never sees another caller's or tenant's state, and the kept
pages stay within their budget.

The model is loaded (the GGUF dequantized) once for the module; each test starts its own
continuous-batching manager on it with the options it needs."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio

from llm_local.backends.base import ReportsCachedTokens
from llm_local.backends.transformers import backend as backend_module
from llm_local.backends.transformers.backend import TransformersBackend
from llm_local.backends.transformers.loader import LoadedModel, load_model, plan_from_settings
from llm_local.backends.transformers.prefix import SMALL_PAGE_TOKENS
from llm_local.core.prompt import prepare_prompt
from llm_local.core.types import (
    ChatTurn,
    Finished,
    GenerationRequest,
    RequestContext,
    Role,
    SamplingOptions,
)
from llm_local.settings.loader import load_settings
from llm_local.settings.schema import AppSettings
from tests.backends.generation import answer_text
from tests.backends.transformers.scoring import NEAR_TIE_NATS, divergence_gap, greedy_gap

pytestmark = pytest.mark.model

PAGE = SMALL_PAGE_TOKENS  # "auto" with sdpa, the test settings' attention
PERSONA = (
    "You are Mira, the phone assistant of a small bakery in Lyon called Le Petit Four. "
    "You answer callers politely and briefly, in one or two sentences. The bakery opens "
    "at seven in the morning and closes at seven in the evening, every day but Monday. "
    "It sells croissants, baguettes, pain au chocolat, fruit tarts and birthday cakes, "
    "which must be ordered two days in advance."
)
CALLER = [
    "Hello, are you open today?",
    "What time do you close?",
    "Can I order a birthday cake for tomorrow?",
    "What do you sell besides bread?",
]
# One page of SmolLM2-135M's float32 KV cache (16 tokens) is 720 KiB: 24 MiB keeps 34
# pages, fewer than the 16 calls' first turns leave behind (3-4 pages each).
SMALL_BUDGET_MB = 24.0


@pytest.fixture(scope="module")
def shared_model() -> Iterator[LoadedModel]:
    yield load_model(plan_from_settings(load_settings(env="test")))


@pytest.fixture
def started(
    shared_model: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> Any:  # (**transformers options) -> async context manager of a loaded backend
    monkeypatch.setattr(backend_module, "load_model", lambda _plan: shared_model)

    @asynccontextmanager
    async def start(**options: object) -> AsyncIterator[TransformersBackend]:
        app = settings(**options)
        backend = TransformersBackend(lambda: plan_from_settings(app), app.transformers)
        await backend.load()
        try:
            yield backend
        finally:
            await backend.aclose()

    return start


def settings(**transformers: object) -> AppSettings:
    loaded = load_settings(env="test")
    return dataclasses.replace(
        loaded, transformers=dataclasses.replace(loaded.transformers, **transformers)
    )


async def answer(backend: TransformersBackend, request: GenerationRequest) -> tuple[str, Finished]:
    return await answer_text(backend, request)


def turn_request(
    persona: str, history: list[ChatTurn], user: str, *, tenant: str, max_new: int = 16
) -> GenerationRequest:
    return GenerationRequest(
        user_prompt=user,
        system_prompt=persona,
        history=tuple(history),
        max_new_tokens=max_new,
        context=RequestContext(request_id="r", tenant_id=tenant),
    )


def prompt_ids(model: LoadedModel, request: GenerationRequest) -> tuple[int, ...]:
    return prepare_prompt(request, model.tokenizer, model.info.context_limit).ids


Turn = tuple[GenerationRequest, str, Finished]


async def call(
    backend: TransformersBackend, persona: str, lines: list[str], *, tenant: str, max_new: int
) -> list[Turn]:
    """One call: each caller line sent with the whole history, the answers fed back."""
    history: list[ChatTurn] = []
    turns: list[Turn] = []
    for line in lines:
        request = turn_request(persona, history, line, tenant=tenant, max_new=max_new)
        text, finished = await answer(backend, request)
        turns.append((request, text, finished))
        history += [ChatTurn(Role.USER, line), ChatTurn(Role.ASSISTANT, text)]
    return turns


async def alone(backend: TransformersBackend, turns: list[Turn], tenant: str) -> list[str]:
    """Each turn's exact prompt again, one at a time, in a tenant of its own: nothing of
    it is cached there (prefix_isolation = tenant), so it is read whole."""
    answers = []
    for index, (request, _, _) in enumerate(turns):
        context = dataclasses.replace(request.context, tenant_id=f"{tenant}-{index}")
        text, finished = await answer(backend, dataclasses.replace(request, context=context))
        assert finished.cached_tokens == 0
        answers.append(text)
    return answers


def gaps_where_different(
    model: LoadedModel, turns: list[Turn], references: list[str]
) -> list[float]:
    """For each answer that differs from its alone-answer to the same prompt: the
    teacher-forced divergence gap (scoring.divergence_gap)."""
    return [
        divergence_gap(model, prompt_ids(model, request), text, reference)
        for (request, text, _), reference in zip(turns, references, strict=True)
        if text != reference
    ]


async def test_a_call_reuses_its_whole_history_and_answers_as_without_reuse(
    started: Any, shared_model: LoadedModel
) -> None:
    async with started(prefix_isolation="tenant") as backend:
        turns = await call(backend, PERSONA, CALLER, tenant="a", max_new=12)
        stats = backend.stats()
        references = await alone(backend, turns, tenant="alone")

        # The same first turn again in its own tenant: every whole page but the last token's.
        request, _, first = turns[0]
        _, again = await answer(backend, request)

    finished = [f for _, _, f in turns]
    assert finished[0].cached_tokens == 0  # nothing was kept before the first turn
    for previous, now in itertools.pairwise(finished):
        # The whole previous prompt (and its answer) in whole pages: what is read again is
        # less than one page of history plus the new lines.
        assert now.cached_tokens >= previous.prompt_tokens - previous.prompt_tokens % PAGE
        assert now.cached_tokens % PAGE == 0 and now.cached_tokens < now.prompt_tokens
    assert stats.prefix_reused_tokens == sum(f.cached_tokens for f in finished)
    assert stats.prefix_read_tokens == sum(f.prompt_tokens - f.cached_tokens for f in finished)
    assert stats.prefix_cache_entries > 0 and stats.prefix_cache_bytes > 0
    assert again.cached_tokens == (first.prompt_tokens - 1) // PAGE * PAGE

    texts = [text for _, text, _ in turns]
    assert all(texts)
    gaps = gaps_where_different(shared_model, turns, references)
    assert max(gaps, default=0.0) <= NEAR_TIE_NATS, (gaps, texts, references)


def personas(n: int) -> list[str]:
    trades = ["bakery", "garage", "dentist", "florist", "bookshop", "pharmacy", "gym", "hotel"]
    cities = ["Lyon", "Oslo"]
    return [
        f"You are the phone assistant of a {trades[i % 8]} in {cities[i // 8 % 2]} "
        f"called Shop {i}. Answer in one sentence. Your customer number is {1000 + i}."
        for i in range(n)
    ]


async def generated_ids(
    backend: TransformersBackend, prompt: tuple[int, ...], max_new: int
) -> tuple[list[int], int]:
    """A greedy answer's token ids straight from the backend, and its cached tokens."""
    ids: list[int] = []
    async with backend.generate(prompt, max_new, SamplingOptions(temperature=0.0)) as stream:
        async for group in stream:
            ids.extend(group)
        assert isinstance(stream, ReportsCachedTokens)
        return ids, stream.cached_tokens


async def test_sixteen_concurrent_calls_each_get_their_own_answer_under_eviction(
    started: Any, shared_model: LoadedModel
) -> None:
    """No other caller's state, ever: 16 calls at once in one tenant, their personas
    sharing their opening pages, the budget evicting kept pages as they go. Every answer
    must be what greedy decoding of its own conversation gives: each of its tokens the
    model's most likely one, scored alone without a cache, or a near tie to it
    (scoring.greedy_gap: CPU rounding follows the batch's shape)."""
    callers = personas(16)
    lines = ["Hello, who are you?", "What is my customer number?"]
    budget = int(SMALL_BUDGET_MB * 2**20)
    tokenizer = shared_model.tokenizer
    answers: list[tuple[tuple[int, ...], list[int], int]] = []  # prompt, answer, cached
    held: list[int] = []
    async with started(prefix_cache_mb=SMALL_BUDGET_MB) as backend:

        async def one(persona: str) -> None:
            history: list[ChatTurn] = []
            for line in lines:
                prompt = prompt_ids(shared_model, turn_request(persona, history, line, tenant="t"))
                ids, cached = await generated_ids(backend, prompt, 4)
                answers.append((prompt, ids, cached))
                held.append(backend.stats().prefix_cache_bytes)
                text = tokenizer.decode([i for i in ids if i not in tokenizer.end_token_ids])
                history += [ChatTurn(Role.USER, line), ChatTurn(Role.ASSISTANT, text)]

        async with trio.open_nursery() as nursery:
            for persona in callers:
                nursery.start_soon(one, persona)
        stats = backend.stats()

    gaps = [greedy_gap(shared_model, prompt, ids) for prompt, ids, _ in answers]
    assert len(gaps) == 2 * len(callers) and all(ids for _, ids, _ in answers)
    assert max(gaps) <= NEAR_TIE_NATS, gaps
    assert stats.prefix_evictions > 0  # the budget forced evictions
    assert max(held) <= budget and stats.prefix_cache_bytes <= budget
    # Reuse happened: second turns found their own first turn's pages (or another
    # caller's identical persona opening) still kept.
    assert sum(cached for _, _, cached in answers) == stats.prefix_reused_tokens > 0


async def test_no_page_is_shared_with_reuse_off(started: Any) -> None:
    async with started(prefix_cache_mb=0.0) as backend:
        request = turn_request(PERSONA, [], CALLER[0], tenant="a", max_new=2)
        _, first = await answer(backend, request)
        _, again = await answer(backend, request)
        stats = backend.stats()

    assert first.cached_tokens == again.cached_tokens == 0
    assert stats.prefix_reused_tokens == stats.prefix_cache_entries == 0
