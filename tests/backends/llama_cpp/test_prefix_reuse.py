"""Conversation prefix reuse in the llama_cpp backend, on the real SmolLM2 GGUF through
core's generation: a call's turns read only what is new, answer exactly what they answer
without reuse, never see another caller's state, and the kept state stays in its budget."""

from __future__ import annotations

import dataclasses
import itertools
import resource
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from llm_local.backends.base import BackendStats
from llm_local.backends.llama_cpp.backend import LlamaCppBackend
from llm_local.backends.llama_cpp.loader import plan_from_settings
from llm_local.core.generation import run_generation
from llm_local.core.prompt import prepare_prompt
from llm_local.core.types import (
    ChatTurn,
    Finished,
    GenerationRequest,
    RequestContext,
    Role,
    SamplingOptions,
    TextChunk,
)
from llm_local.settings.loader import load_settings
from llm_local.settings.schema import AppSettings
from tests.backends.llama_cpp.scoring import NEAR_TIE_NATS, Scorer

pytestmark = pytest.mark.model

PERSONA = (
    "You are Mira, the phone assistant of a small bakery in Lyon called Le Petit Four. "
    "You answer callers politely and briefly, in one or two sentences. The bakery opens "
    "at seven in the morning and closes at seven in the evening, every day but Monday. "
    "It sells croissants, baguettes, pain au chocolat, fruit tarts and birthday cakes, "
    "which must be ordered two days in advance. Delivery is possible within the city "
    "for orders above thirty euros."
)
CALLER = [
    "Hello, are you open today?",
    "What time do you close?",
    "Can I order a birthday cake for tomorrow?",
    "Do you deliver to my street?",
    "What do you sell besides bread?",
]
# One MiB of SmolLM2's KV cache holds 45 tokens: room for one short conversation at most.
TINY_BUDGET_MB = 2.0
# Greedy SmolLM2 counts on and on (tests/backends/llama_cpp/test_backend.py relies on it too):
# a stream that outlives the calls decoding beside it.
ENDLESS = "Write the numbers from 1 to 1000, separated by commas."
# 200 calls, as the issue asks (about 30 s on a quiet 2-core machine, 53 s on a loaded one).
CALL_WAVES = 25


def settings(**llama_cpp: object) -> AppSettings:
    loaded = load_settings(env="test")
    options = dataclasses.replace(
        loaded.llama_cpp, **{"kv_cache_tokens": 8192, "sequences": 16, **llama_cpp}
    )
    return dataclasses.replace(loaded, llama_cpp=options)


@pytest.fixture
async def reusing() -> AsyncIterator[LlamaCppBackend]:
    async with loaded(settings(prefix_cache_mb=64.0)) as backend:
        yield backend


class loaded:  # used as `async with loaded(...)`
    def __init__(self, app_settings: AppSettings) -> None:
        self._backend = LlamaCppBackend(lambda: plan_from_settings(app_settings))

    async def __aenter__(self) -> LlamaCppBackend:
        await self._backend.load()
        return self._backend

    async def __aexit__(self, *_: object) -> None:
        await self._backend.aclose()


async def settled_stats(backend: LlamaCppBackend) -> BackendStats:
    """The backend's stats once its worker has released every request: a consumer gets its
    last token before the worker, in the same step, keeps the request's sequence."""
    for _ in range(3000):  # 30 s at most: a hang guard
        stats = backend.stats()
        if not stats.running:
            return stats
        await trio.sleep(0.01)
    raise AssertionError("the backend's worker kept a request running")


async def answer(
    backend: LlamaCppBackend, request: GenerationRequest
) -> tuple[str, Finished, tuple[int, ...]]:
    """The text, how it finished, and the token ids generated."""
    prepared = prepare_prompt(request, backend.tokenizer, backend.info.context_limit)
    chunks: list[TextChunk] = []

    async def on_text(chunk: TextChunk) -> None:
        chunks.append(chunk)

    finished = await run_generation(backend, request, prepared, on_text)
    return "".join(c.text for c in chunks), finished, prepared.ids


def turn_request(
    persona: str, history: list[ChatTurn], user: str, *, tenant: str = "t", max_new: int = 24
) -> GenerationRequest:
    return GenerationRequest(
        user_prompt=user,
        system_prompt=persona,
        history=tuple(history),
        max_new_tokens=max_new,
        context=RequestContext(request_id="r", tenant_id=tenant),
    )


async def call(
    backend: LlamaCppBackend,
    persona: str,
    lines: list[str],
    *,
    tenant: str = "t",
    max_new: int = 24,
) -> list[tuple[str, Finished]]:
    """One call: each caller line sent with the whole history, the answers fed back."""
    history: list[ChatTurn] = []
    results: list[tuple[str, Finished]] = []
    for line in lines:
        text, finished, _ = await answer(
            backend, turn_request(persona, history, line, tenant=tenant, max_new=max_new)
        )
        results.append((text, finished))
        history += [ChatTurn(Role.USER, line), ChatTurn(Role.ASSISTANT, text)]
    return results


async def test_a_call_reads_only_its_new_turn_and_answers_as_without_reuse(
    reusing: LlamaCppBackend,
) -> None:
    with_reuse = await call(reusing, PERSONA, CALLER)
    async with loaded(settings(prefix_cache_mb=0.0)) as fresh:
        without = await call(fresh, PERSONA, CALLER)
        assert fresh.stats().prefix_reused_tokens == 0

    assert [text for text, _ in with_reuse] == [text for text, _ in without]
    assert all(text for text, _ in with_reuse)
    assert with_reuse[0][1].cached_tokens == 0  # nothing was kept before the first turn
    assert [f.cached_tokens for _, f in without] == [0] * len(CALLER)
    for (_, previous), (_, now) in itertools.pairwise(with_reuse):
        # Every later turn reuses at least the whole previous prompt.
        assert now.cached_tokens >= previous.prompt_tokens
        assert now.cached_tokens < now.prompt_tokens
    stats = await settled_stats(reusing)
    assert stats.prefix_reused_tokens == sum(f.cached_tokens for _, f in with_reuse)
    assert stats.prefix_read_tokens == sum(f.prompt_tokens - f.cached_tokens for _, f in with_reuse)
    assert stats.prefix_cache_entries == 1 and stats.prefix_cache_bytes > 0


async def test_a_call_evicted_for_its_sequence_comes_back_from_host_memory() -> None:
    """Three calls taking turns on one running sequence and one kept: each turn evicts the
    call kept before it, saved to host memory (llama_state_seq_get_data); its next turn
    restores it (set_data) and reads only the new tokens, answering as without reuse."""
    callers = personas(3)
    lines = ["Hello, who are you?", "What is my customer number?", "Thanks, goodbye."]

    async def turns(backend: LlamaCppBackend) -> list[list[tuple[str, Finished]]]:
        results: list[list[tuple[str, Finished]]] = [[] for _ in callers]
        histories: list[list[ChatTurn]] = [[] for _ in callers]
        for line in lines:
            for i, persona in enumerate(callers):  # A, B, C, A, B, C, ...
                text, finished, _ = await answer(
                    backend, turn_request(persona, histories[i], line, max_new=12)
                )
                results[i].append((text, finished))
                histories[i] += [ChatTurn(Role.USER, line), ChatTurn(Role.ASSISTANT, text)]
        return results

    async with loaded(settings(prefix_cache_mb=0.0, sequences=1)) as plain:
        without = await turns(plain)
    async with loaded(settings(prefix_cache_mb=64.0, sequences=1)) as backend:
        restored = await turns(backend)
        stats = await settled_stats(backend)

        gaps, same = nll_gaps(backend, callers, lines, restored, without)

    # Measured: 7 and 8 of 9 answers equal as text in two runs, the others a near tie apart
    # (-0.18 nats; the 16-call test's docstring: rounding follows where the cells lie).
    assert max(gaps, default=0.0) <= NEAR_TIE_NATS, (gaps, same)
    assert same >= 5, same
    for call_turns in restored:
        for (_, previous), (_, now) in itertools.pairwise(call_turns):
            assert now.cached_tokens >= previous.prompt_tokens  # the whole call came back
    assert stats.prefix_evictions == 0  # moved to host memory, none dropped
    assert stats.prefix_cache_entries == 3  # one kept in the context, two in host memory


def personas(n: int) -> list[str]:
    trades = ["bakery", "garage", "dentist", "florist", "bookshop", "pharmacy", "gym", "hotel"]
    cities = ["Lyon", "Oslo"]
    return [
        f"You are the phone assistant of a {trades[i % 8]} in {cities[i // 8 % 2]} "
        f"called Shop {i}. Answer in one sentence. Your customer number is {1000 + i}."
        for i in range(n)
    ]


SIXTEEN_LINES = ["Hello, who are you?", "What is my customer number?"]


@pytest.fixture(scope="module")
def sixteen_alone() -> list[list[tuple[str, Finished]]]:
    """Each of the 16 calls answered alone, no reuse: what both KV layouts must match."""

    async def answer_alone() -> list[list[tuple[str, Finished]]]:
        async with loaded(settings(prefix_cache_mb=0.0)) as alone_backend:
            return [await call(alone_backend, p, SIXTEEN_LINES, max_new=8) for p in personas(16)]

    return trio.run(answer_alone)


@pytest.mark.parametrize("kv_layout", ["pool", "per_sequence"])
async def test_sixteen_concurrent_calls_each_get_their_alone_answer_under_eviction(
    kv_layout: str, sixteen_alone: list[list[tuple[str, Finished]]]
) -> None:
    """No other caller's state, ever: 16 calls at once, their personas sharing leading
    tokens (shared between calls), the cache holding other callers' sequences and evicting
    under a tiny budget. In both KV layouts: one pool shares a prefix's cells; a stream per
    sequence copies the source's stream and cuts the copy (llama.cpp copies whole streams).

    Exact text equality is not what llama.cpp gives on a CPU even without any cache: its
    rounding depends on which sequences share a batch and where a sequence's cells lie in
    the pool (flash attention accumulates over cells in their order). Measured here: 16 calls
    decoded together without reuse answered as alone in 6 of 16. So each call is compared
    teacher-forced instead: where its answer first leaves its alone-answer, the model scored
    alone (same prompt, same tokens before) finds both tokens about equally likely
    (`NEAR_TIE_NATS`: a near tie that rounding flipped), where another caller's state would
    pick a token the caller's own conversation does not predict."""
    callers, lines, alone = personas(16), SIXTEEN_LINES, sixteen_alone
    reusing = settings(prefix_cache_mb=TINY_BUDGET_MB, kv_layout=kv_layout)
    async with loaded(reusing) as backend:
        together: list[list[tuple[str, Finished]]] = [[] for _ in callers]

        async def one(i: int) -> None:
            together[i] = await call(backend, callers[i], lines, tenant=f"t{i}", max_new=8)

        async with trio.open_nursery() as nursery:
            for i in range(len(callers)):
                nursery.start_soon(one, i)
        stats = await settled_stats(backend)

        gaps, same = nll_gaps(backend, callers, lines, together, alone)

    assert max(gaps, default=0.0) <= NEAR_TIE_NATS, (gaps, same)
    assert same >= len(gaps) // 8, same
    assert stats.prefix_evictions > 0  # the budget forced evictions
    # Reuse happened across callers (the shared persona opening) and within calls.
    assert sum(f.cached_tokens for c in together for _, f in c) == stats.prefix_reused_tokens
    assert stats.prefix_reused_tokens > 0
    assert stats.prefix_cache_bytes <= TINY_BUDGET_MB * 1024 * 1024


Answers = list[list[tuple[str, Finished]]]


def nll_gaps(
    backend: LlamaCppBackend, callers: list[str], lines: list[str], mine: Answers, alone: Answers
) -> tuple[list[float], int]:
    """Per call, at its first answer that differs from the alone-answer (the history before
    it equal, so the prompt is the same): the divergence gap (`Scorer.divergence_gap`); and
    how many answers are equal as text."""
    scorer = Scorer(backend, plan_from_settings(settings()).gguf)
    gaps: list[float] = []
    try:
        for persona, answers, reference in zip(callers, mine, alone, strict=True):
            history: list[ChatTurn] = []
            for line, (text, _), (ref_text, _) in zip(lines, answers, reference, strict=True):
                if text != ref_text:
                    prompt = _ids(backend, turn_request(persona, history, line))
                    gaps.append(scorer.divergence_gap(prompt, text, ref_text))
                    break
                history += [ChatTurn(Role.USER, line), ChatTurn(Role.ASSISTANT, text)]
    finally:
        scorer.free()
    same = sum(
        text == ref
        for answers, reference in zip(mine, alone, strict=True)
        for (text, _), (ref, _) in zip(answers, reference, strict=True)
    )
    return gaps, same


def _ids(backend: LlamaCppBackend, request: GenerationRequest) -> tuple[int, ...]:
    return prepare_prompt(request, backend.tokenizer, backend.info.context_limit).ids


async def test_an_isolated_tenant_never_reuses_another_tenant_s_prefix() -> None:
    question = "Hello, are you open today?"
    async with loaded(settings(prefix_isolation="tenant")) as backend:
        _, first, _ = await answer(backend, turn_request(PERSONA, [], question, tenant="a"))
        reused_before = backend.stats().prefix_reused_tokens
        _, other, _ = await answer(backend, turn_request(PERSONA, [], question, tenant="b"))
        assert other.cached_tokens == 0
        assert backend.stats().prefix_reused_tokens == reused_before
        _, again, _ = await answer(backend, turn_request(PERSONA, [], question, tenant="a"))
        assert again.cached_tokens == again.prompt_tokens - 1  # its own: all but the last

    async with loaded(settings(prefix_isolation="none")) as shared:
        await answer(shared, turn_request(PERSONA, [], question, tenant="a"))
        _, other, _ = await answer(shared, turn_request(PERSONA, [], question, tenant="b"))
        assert other.cached_tokens == other.prompt_tokens - 1
    assert first.cached_tokens == 0


def rss_bytes() -> int:
    resident_pages = int(Path("/proc/self/statm").read_text().split()[1])
    return resident_pages * resource.getpagesize()


async def test_kept_state_stays_within_its_budget_over_many_calls() -> None:
    async with loaded(settings(prefix_cache_mb=TINY_BUDGET_MB)) as backend:
        budget_bytes = TINY_BUDGET_MB * 1024 * 1024
        held: list[int] = []
        rss: list[int] = []

        async def one(i: int) -> None:
            persona = f"You answer call {i} of shop {i % 16}."
            await answer(backend, turn_request(persona, [], "Hi!", tenant=f"t{i}", max_new=2))
            held.append(backend.stats().prefix_cache_bytes)

        for wave in range(CALL_WAVES):  # 8 calls at a time
            async with trio.open_nursery() as nursery:
                for i in range(8):
                    nursery.start_soon(one, wave * 8 + i)
            rss.append(rss_bytes())
        stats = await settled_stats(backend)

    assert len(held) == CALL_WAVES * 8
    assert max(held) <= budget_bytes
    assert stats.prefix_evictions > len(held) - 16  # each call its own: nearly all evicted
    # The process does not grow with the calls: after the first waves, flat (allocator
    # noise aside), far below what every call kept would take (~10 MB of KV).
    assert rss[-1] - rss[4] < 16 * 1024 * 1024


async def test_a_turn_waits_in_host_memory_while_others_decode(
    reusing: LlamaCppBackend,
) -> None:
    """In one pool every idle cell slows every step of the others (attention scans the
    pool's used range), so while anything decodes a finished turn's sequence is saved to
    host memory, and the call's next turn comes back from there reading only what is new;
    once nothing decodes, the last turn stays in the pool."""
    endless = _ids(reusing, GenerationRequest(user_prompt=ENDLESS))
    scheduler = reusing._scheduler
    assert scheduler is not None

    async def decode_meanwhile(task_status: trio.TaskStatus[None]) -> None:
        async with reusing.generate(endless, 2000, SamplingOptions()) as tokens:
            started = False
            async for _ in tokens:
                if not started:
                    started = True
                    task_status.started()

    async with trio.open_nursery() as nursery:
        await nursery.start(decode_meanwhile)
        turns = await call(reusing, PERSONA, CALLER[:3], max_new=8)
        for _ in range(3000):  # until the worker released the last turn (a hang guard)
            if reusing.stats().running == 1:
                break
            await trio.sleep(0.01)
        while_decoding = scheduler.reuse_stats()
        nursery.cancel_scope.cancel()
    await settled_stats(reusing)
    after = scheduler.reuse_stats()

    for (_, previous), (_, now) in itertools.pairwise(turns):
        assert now.cached_tokens >= previous.prompt_tokens  # the whole call came back
    assert while_decoding.idle_sequences == 0  # nothing idle in the pool meanwhile
    assert while_decoding.host_sequences >= 1 and while_decoding.restores >= 2
    assert after.idle_sequences >= 1  # the endless stream's, kept once nothing decodes
