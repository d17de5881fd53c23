"""Shared system prompts as CTranslate2 static prompts: the admission policy alone, the
exactness of cached decoding, and the memory bound, measured on the real model."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
import trio

from llm_local.backends.ct2 import BatchingOptions, CT2Backend
from llm_local.backends.ct2.loader import LoadedModel, load_model
from llm_local.backends.ct2.prefix_cache import (
    PrefixCachePolicy,
    activation_bytes,
    kv_bytes_per_token,
    read_variable_shapes,
    release_freed_memory,
)
from llm_local.core.generation import run_generation
from llm_local.core.prompt import prepare_prompt
from llm_local.core.types import GenerationRequest, TextChunk

from .conftest import plan

PERSONA = (
    "You are Ada, the voice assistant of the Northwind Savings Bank. You answer callers "
    "politely and briefly, in one or two sentences, without lists or markdown. You never "
    "ask for a full card number or a password. If a caller wants to block a card, tell them "
    "you will transfer them to an agent. Opening hours are 8 to 18 on weekdays. "
)
QUESTIONS = ["What are your opening hours?", "Can you block my card?", "What is 2 + 2?"]


# -- the admission policy, pure --------------------------------------------------------


def test_a_prefix_seen_once_is_not_cached_and_a_repeated_one_is() -> None:
    policy = PrefixCachePolicy(budget_bytes=1000, bytes_per_token=10)
    assert not policy.should_cache((1, 2, 3))
    assert policy.should_cache((1, 2, 3))
    assert policy.should_cache((1, 2, 3))
    assert (policy.cached_prefixes, policy.cached_bytes) == (1, 30)
    assert not policy.is_warm((1, 2, 3))  # no batch with it has finished yet
    policy.mark_warm((1, 2, 3))
    assert policy.is_warm((1, 2, 3))


def test_prefixes_beyond_the_budget_stay_uncached_until_a_reset() -> None:
    policy = PrefixCachePolicy(budget_bytes=50, bytes_per_token=10)
    first, second, third = (1,) * 3, (2,) * 3, (3,) * 3
    for prefix in (first, first, second, second):
        policy.should_cache(prefix)
    assert policy.cached_bytes == 30  # `second` (30 more) would pass 50
    assert not policy.wants_reset()  # one refusal: the admitted set may still be right
    policy.should_cache(third)
    assert not policy.should_cache(third)
    assert policy.wants_reset()  # as many refusals as admitted prefixes, and at least 2
    policy.reset()
    assert (policy.cached_prefixes, policy.cached_bytes) == (0, 0)
    assert policy.should_cache(third)  # seen recently: admitted at once after the reset


def test_the_bytes_per_token_come_from_the_layer_shapes(test_model_dir: Path) -> None:
    shapes = read_variable_shapes(test_model_dir / "model.bin")
    norms = [shape for name, shape in shapes.items() if name.endswith("attention/layer_norm/gamma")]
    assert norms  # a decoder whose layers were read
    per_token = kv_bytes_per_token(test_model_dir / "model.bin", activation_bytes("float32"))
    assert per_token == len(norms) * 2 * norms[0][0] * 4
    assert activation_bytes("int8_float16") == 2
    assert read_variable_shapes(test_model_dir / "config.json") == {}


# -- the real model --------------------------------------------------------------------


async def answers(
    backend: CT2Backend, system_prompt: str, questions: Sequence[str], max_new_tokens: int = 8
) -> list[str]:
    """Greedy answers, all at once (one batch when they share a prefix)."""
    texts: dict[int, str] = {}

    async def ask(index: int) -> None:
        request = GenerationRequest(
            user_prompt=questions[index],
            system_prompt=system_prompt,
            max_new_tokens=max_new_tokens,
        )
        prepared = prepare_prompt(request, backend.tokenizer, backend.info.context_limit)
        assert prepared.shared_prefix_length > 0
        chunks: list[str] = []

        async def on_text(chunk: TextChunk) -> None:
            chunks.append(chunk.text)

        await run_generation(backend, request, prepared, on_text)
        texts[index] = "".join(chunks)

    async with trio.open_nursery() as nursery:
        for index in range(len(questions)):
            nursery.start_soon(ask, index)
    return [texts[index] for index in range(len(questions))]


async def test_float32_greedy_is_the_same_with_and_without_the_prefix_cache(
    float32_model: LoadedModel,
) -> None:
    system = PERSONA
    plain = CT2Backend.from_loaded(float32_model, batching=BatchingOptions(prefix_cache_mb=0))
    await plain.load()
    try:
        expected = [(await answers(plain, system, [question]))[0] for question in QUESTIONS]
    finally:
        await plain.aclose()

    cached = CT2Backend.from_loaded(float32_model, batching=BatchingOptions(prefix_cache_mb=64))
    await cached.load()
    try:
        # Seen once: a static prompt read for the batch; seen again: cached by
        # CTranslate2; the third time: read from its cache.
        for _ in range(3):
            assert await answers(cached, system, QUESTIONS) == expected
        assert cached.stats().prefix_cache_entries == 1
    finally:
        await cached.aclose()


def _rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096


async def _cache_many_system_prompts(model: LoadedModel, budget_mb: float, count: int) -> int:
    """RSS growth after `count` distinct system prompts, each sent twice (admitted)."""
    backend = CT2Backend.from_loaded(model, batching=BatchingOptions(prefix_cache_mb=budget_mb))
    await backend.load()
    try:
        await answers(backend, "You are a helpful assistant.", ["Hi"], 1)  # warm the buffers
        # Memory freed earlier in this process (another test's model) would otherwise be
        # reused by the cache without showing as growth.
        release_freed_memory()
        before = _rss_bytes()
        for tenant in range(count):
            system = f"Tenant {tenant}. " + PERSONA
            for _ in range(2):
                await answers(backend, system, ["Hi"], 1)
        return _rss_bytes() - before
    finally:
        await backend.aclose()


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="RSS is read from /proc")
async def test_the_prefix_cache_memory_stays_bounded_across_many_system_prompts(
    test_model_dir: Path,
) -> None:
    """Measured: without a bound every system prompt stays in CTranslate2's cache for
    good; with one, the cache is dropped when it fills and the memory is reused."""
    tenants = 8
    model = load_model(plan(test_model_dir, "int8", inter_threads=1))
    try:
        per_prompt = model.kv_bytes_per_token * 80  # ~80 tokens of persona per prompt
        unbounded = await _cache_many_system_prompts(model, 1024, tenants)
    finally:
        model.generator.unload_model()
        del model
    model = load_model(plan(test_model_dir, "int8", inter_threads=1))
    try:
        budget = 2 * per_prompt
        bounded = await _cache_many_system_prompts(model, budget / 2**20, tenants)
    finally:
        model.generator.unload_model()
        del model
    print(
        f"RSS growth, {tenants} system prompts: unbounded {unbounded / 2**20:.0f} MiB, "
        f"bounded to {budget / 2**20:.0f} MiB: {bounded / 2**20:.0f} MiB"
    )
    # Every prompt pinned: at least half of their estimated size shows in RSS.
    assert unbounded > tenants * per_prompt / 2
    # Bounded: the budget, one dropped cache's worth of memory being reused, and a margin
    # of four prompts for the allocator: far below what the unbounded run kept.
    assert bounded < 2 * budget + 4 * per_prompt
