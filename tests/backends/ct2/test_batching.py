"""Concurrent generations batched on the real SmolLM2 model: each gets its own answer.

float32 (the int8 weights computed in float32) makes batched greedy decoding give the
same tokens as decoding alone, so those tests compare token ids exactly; int8 batches of
mixed prompt lengths change greedy outputs slightly (FINDINGS), so the int8 test checks
what does not depend on rounding: each answer names its own country's capital.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio

from llm_local.backends.base import BackendError, ModelTokenizer
from llm_local.backends.ct2 import BatchingOptions, BatchStarted, CT2Backend
from llm_local.backends.ct2.loader import LoadedModel
from llm_local.backends.shared.costs import CostEstimate, CostModel
from llm_local.core.generation import run_generation
from llm_local.core.prompt import prepare_prompt
from llm_local.core.types import (
    NO_HINTS,
    Finished,
    FinishReason,
    GenerationHints,
    GenerationRequest,
    SamplingOptions,
    TextChunk,
)

from .conftest import FRANCE, chat_ids

pytestmark = pytest.mark.model

GREEDY = SamplingOptions()


class RecordingBackend:
    """Passes one generation through to the real backend, keeping the ids it yields."""

    def __init__(self, inner: CT2Backend) -> None:
        self.inner = inner
        self.ids: list[int] = []

    @property
    def tokenizer(self) -> ModelTokenizer:
        return self.inner.tokenizer

    @asynccontextmanager
    async def generate(
        self,
        prompt_ids: Sequence[int],
        max_new_tokens: int,
        sampling: SamplingOptions,
        hints: GenerationHints = NO_HINTS,
    ) -> AsyncIterator[AsyncIterator[Sequence[int]]]:
        async with self.inner.generate(prompt_ids, max_new_tokens, sampling, hints) as stream:
            yield self._record(stream)

    async def _record(self, stream: AsyncIterator[Sequence[int]]) -> AsyncIterator[Sequence[int]]:
        async for group in stream:
            self.ids.extend(group)
            yield group


@dataclass
class Outcome:
    text: str
    finished: Finished
    ids: list[int] = field(default_factory=list)


async def generate(backend: CT2Backend, request: GenerationRequest) -> Outcome:
    recording = RecordingBackend(backend)
    prepared = prepare_prompt(request, backend.tokenizer, backend.info.context_limit)
    pieces: list[str] = []

    async def on_text(chunk: TextChunk) -> None:
        pieces.append(chunk.text)

    finished = await run_generation(recording, request, prepared, on_text)  # type: ignore[arg-type]
    # Tokens after the one that completed a stop sequence may have arrived in the same
    # group; what the request consumed is what counts.
    return Outcome("".join(pieces), finished, recording.ids[: finished.completion_tokens])


async def generate_all(backend: CT2Backend, requests: Sequence[GenerationRequest]) -> list[Outcome]:
    outcomes: list[Outcome | None] = [None] * len(requests)

    async def run(index: int) -> None:
        outcomes[index] = await generate(backend, requests[index])

    async with trio.open_nursery() as nursery:
        for index in range(len(requests)):
            nursery.start_soon(run, index)
    return [outcome for outcome in outcomes if outcome is not None]


class FreeRestarts(CostModel):
    """Costs as if reading prompt tokens were free, whatever is measured."""

    def __init__(self) -> None:
        super().__init__(CostEstimate(step_base_s=0.03, step_per_item_s=0.0, prefill_token_s=0.0))

    def observe_prefill(self, tokens: int, seconds: float) -> None:
        pass

    def observe_step(self, batch_size: int, seconds: float) -> None:
        pass


@asynccontextmanager
async def serving(
    model: LoadedModel, events: list[BatchStarted], costs: CostModel | None = None, **options: float
) -> AsyncIterator[CT2Backend]:
    backend = CT2Backend.from_loaded(
        model,
        batching=BatchingOptions(**options),
        on_batch=events.append,  # type: ignore[arg-type]
        costs=costs,
    )
    await backend.load()
    try:
        yield backend
    finally:
        await backend.aclose()


MIXED_REQUESTS = [
    GenerationRequest(user_prompt=FRANCE, max_new_tokens=24),  # ends with <|im_end|>
    GenerationRequest(user_prompt="Name three colors.", max_new_tokens=6),  # length
    GenerationRequest(
        user_prompt="Write a haiku about the sea.", max_new_tokens=30, stop_sequences=("\n",)
    ),
    GenerationRequest(user_prompt="What is 2 + 2?", max_new_tokens=16, stop_sequences=(" is",)),
]


async def test_float32_batched_greedy_equals_each_request_alone(
    float32_model: LoadedModel,
) -> None:
    events: list[BatchStarted] = []
    async with serving(float32_model, events, batch_wait_ms=50, min_split_size=8) as backend:
        alone = [await generate(backend, request) for request in MIXED_REQUESTS]
        assert [event.size for event in events] == [1, 1, 1, 1]
        events.clear()
        together = await generate_all(backend, MIXED_REQUESTS)
    assert [event.size for event in events] == [4]  # really one batch
    assert together == alone
    # The four ways of ending are all there, so the comparison covers each of them.
    assert [outcome.finished.reason for outcome in alone] == [
        FinishReason.STOP,
        FinishReason.LENGTH,
        FinishReason.STOP,
        FinishReason.STOP,
    ]
    assert "Paris" in alone[0].text
    assert alone[1].finished.completion_tokens == 6
    assert "\n" not in alone[2].text and alone[2].text
    assert not alone[3].text.endswith(" is") and " is" not in alone[3].text


CAPITALS = {
    "France": "Paris",
    "Germany": "Berlin",
    "Italy": "Rome",
    "Japan": "Tokyo",
    "Spain": "Madrid",
    "Egypt": "Cairo",
}


async def test_batched_answers_each_belong_to_their_own_question(
    float32_model: LoadedModel,
) -> None:
    # float32: the assertions read answer text; int8's greedy near-ties differ by CPU.
    events: list[BatchStarted] = []
    requests = [
        GenerationRequest(
            user_prompt=f"What is the capital of {country}? Answer in one sentence.",
            max_new_tokens=12 + index,  # different lengths in one batch
        )
        for index, country in enumerate(CAPITALS)
    ]
    async with serving(float32_model, events, batch_wait_ms=50, min_split_size=8) as backend:
        outcomes = await generate_all(backend, requests)
    assert [event.size for event in events] == [len(CAPITALS)]
    for (country, city), outcome in zip(CAPITALS.items(), outcomes, strict=True):
        assert city in outcome.text, (country, outcome.text)
        others = [other for other in CAPITALS.values() if other != city]
        assert not any(other in outcome.text for other in others), (country, outcome.text)


async def test_cancelling_one_item_leaves_the_rest_of_its_batch_intact(
    float32_model: LoadedModel,
) -> None:
    events: list[BatchStarted] = []
    kept = [MIXED_REQUESTS[0], MIXED_REQUESTS[2]]
    # No static prefixes: the request sent without hints would batch apart otherwise.
    async with serving(
        float32_model, events, batch_wait_ms=50, min_split_size=8, prefix_cache_mb=0
    ) as backend:
        alone = [await generate(backend, request) for request in kept]
        events.clear()
        ids = chat_ids(backend.tokenizer, "Tell me a long story about a dragon.")
        received = 0
        outcomes: list[Outcome] = []

        async def leave_after_two_tokens() -> None:
            nonlocal received
            async with backend.generate(ids, 200, GREEDY) as stream:
                async for group in stream:
                    received += len(group)
                    if received >= 2:
                        return

        async def keep(request: GenerationRequest) -> None:
            outcomes.append(await generate(backend, request))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(leave_after_two_tokens)
            for request in kept:
                nursery.start_soon(keep, request)
    assert [event.size for event in events] == [3]
    assert 2 <= received < 200
    assert sorted(outcomes, key=lambda o: o.text) == sorted(alone, key=lambda o: o.text)


async def test_mixed_sampling_options_are_never_in_one_batch(
    float32_model: LoadedModel,
) -> None:
    events: list[BatchStarted] = []
    sampled = SamplingOptions(temperature=0.8, top_k=20)
    seeded = SamplingOptions(temperature=0.8, top_k=20, seed=5)
    requests = [
        GenerationRequest(user_prompt=FRANCE, max_new_tokens=5),
        GenerationRequest(user_prompt="Name three colors.", max_new_tokens=5),
        GenerationRequest(user_prompt=FRANCE, max_new_tokens=5, sampling=sampled),
        GenerationRequest(user_prompt="Name three colors.", max_new_tokens=5, sampling=sampled),
        GenerationRequest(user_prompt=FRANCE, max_new_tokens=5, sampling=seeded),
    ]
    # No static prefixes: the batch keys are then the sampling options' own.
    async with serving(
        float32_model, events, batch_wait_ms=50, min_split_size=8, prefix_cache_mb=0
    ) as backend:
        alone_greedy = [await generate(backend, request) for request in requests[:2]]
        events.clear()
        outcomes = await generate_all(backend, requests)
    for event in events:
        assert set(event.item_keys) == {event.batch_key}
    assert Counter((event.batch_key, event.size) for event in events) == Counter(
        [(GREEDY.batch_key(), 2), (sampled.batch_key(), 2), (seeded.batch_key(), 1)]
    )
    assert outcomes[:2] == alone_greedy


async def test_the_backend_queue_stays_bounded(float32_model: LoadedModel) -> None:
    queued_when_a_batch_starts: list[int] = []
    backends: list[CT2Backend] = []

    def watch(event: BatchStarted) -> None:
        queued_when_a_batch_starts.append(backends[0].stats().queued)

    backend = CT2Backend.from_loaded(
        float32_model,
        batching=BatchingOptions(batch_wait_ms=0, max_batch_size=1, max_queued=2),
        on_batch=watch,
    )
    backends.append(backend)
    await backend.load()
    requests = [GenerationRequest(user_prompt="Hi", max_new_tokens=3)] * 6
    outcomes = await generate_all(backend, requests)
    await backend.aclose()
    assert len(queued_when_a_batch_starts) == 6
    assert max(queued_when_a_batch_starts) <= 2
    assert [outcome.finished.completion_tokens for outcome in outcomes] == [3] * 6


async def test_a_failing_batch_fails_only_its_own_requests(int8_model: LoadedModel) -> None:
    events: list[BatchStarted] = []
    # Another batch key, still greedy: what the other batch decodes is deterministic (an
    # unseeded sample may reach the end token early, and a seed reproduces only on a
    # fresh worker).
    other_key = SamplingOptions(repetition_penalty=1.1)
    async with serving(int8_model, events, batch_wait_ms=50) as backend:
        good_ids = chat_ids(backend.tokenizer, FRANCE)
        bad_ids = [*good_ids[:-1], 10_000_000]  # outside the vocabulary
        results: dict[str, object] = {}

        async def run(name: str, ids: Sequence[int], sampling: SamplingOptions) -> None:
            try:
                async with backend.generate(ids, 4, sampling) as stream:
                    results[name] = [token async for group in stream for token in group]
            except BackendError as exc:
                results[name] = exc

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run, "bad", bad_ids, GREEDY)
            nursery.start_soon(run, "other batch", good_ids, other_key)
        # The backend keeps serving after the failure.
        async with backend.generate(good_ids, 3, GREEDY) as stream:
            after = [token async for group in stream for token in group]
    assert isinstance(results["bad"], BackendError)
    assert "outside the vocabulary" in str(results["bad"])
    # Unharmed: it ends normally, at its length limit or at its end token.
    other = results["other batch"]
    assert isinstance(other, list)
    assert len(other) == 4 or other[-1] in backend.tokenizer.end_token_ids
    assert len(after) == 3
    assert len(events) == 3


class FailingMidway:
    """The real Generator, except that a batch holding `poison` raises from inside
    CTranslate2's decoding loop once `after_steps` token callbacks ran (CTranslate2 hands
    a callback's exception out of generate_batch, as it does its own errors). The
    failing part is the only thing stood in for: no prompt makes a real model fail
    halfway through a batch on demand."""

    def __init__(
        self, generator: Any, poison: list[str], after_steps: int, error: BaseException
    ) -> None:
        self._generator = generator
        self._poison = poison
        self._after_steps = after_steps
        self._error = error

    def generate_batch(self, prompts: list[list[str]], **kwargs: Any) -> Any:
        if self._poison not in prompts:
            return self._generator.generate_batch(prompts, **kwargs)
        callback = kwargs.pop("callback")
        steps = 0

        def failing(step: Any) -> bool:
            nonlocal steps
            steps += 1
            if steps > self._after_steps:
                raise self._error
            return bool(callback(step))

        return self._generator.generate_batch(prompts, callback=failing, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._generator, name)


@pytest.mark.parametrize(
    "error",
    [RuntimeError("decoding failed"), SystemExit("the decoding thread exited")],
    ids=["an error", "a dying thread"],
)
async def test_a_batch_that_fails_midway_fails_only_its_own_requests(
    float32_model: LoadedModel, error: BaseException
) -> None:
    events: list[BatchStarted] = []
    tokenizer = float32_model.tokenizer
    poisoned_ids = chat_ids(tokenizer, FRANCE)
    neighbour_ids = chat_ids(tokenizer, "Name three colors.")
    failing = FailingMidway(
        float32_model.generator, tokenizer.convert_ids_to_tokens(poisoned_ids), 4, error
    )
    model = LoadedModel(generator=failing, tokenizer=tokenizer, info=float32_model.info)
    # Another batch key, still greedy, as in the test above.
    other_key = SamplingOptions(repetition_penalty=1.1)
    # min_split_size: the two greedy requests stay one batch even with a worker idle.
    async with serving(model, events, batch_wait_ms=50, min_split_size=8) as backend:
        results: dict[str, tuple[list[int], BackendError | None]] = {}

        async def run(name: str, ids: Sequence[int], sampling: SamplingOptions) -> None:
            received: list[int] = []
            try:
                async with backend.generate(ids, 12, sampling) as stream:
                    async for group in stream:
                        received.extend(group)
            except BackendError as exc:
                results[name] = (received, exc)
            else:
                results[name] = (received, None)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run, "poisoned", poisoned_ids, GREEDY)
            # The same prompt: both decode from the first step, 2 tokens each in 4 steps.
            nursery.start_soon(run, "same batch", poisoned_ids, GREEDY)
            nursery.start_soon(run, "other batch", neighbour_ids, other_key)
        # The backend keeps serving after the failure, on every worker.
        async with backend.generate(neighbour_ids, 3, GREEDY) as stream:
            after = [token async for group in stream for token in group]
    assert [event.size for event in events[:2]] in ([2, 1], [1, 2])
    for name in ("poisoned", "same batch"):
        received, failure = results[name]
        assert len(received) == 2  # 4 steps of a batch of 2, then the failure
        assert failure is not None
        assert str(error) in str(failure)
    # Unharmed: it ends normally, with every token it generated up to its length limit
    # or its end token, whichever it reached.
    other_tokens, other_failure = results["other batch"]
    assert other_failure is None
    assert len(other_tokens) == 12 or other_tokens[-1] in tokenizer.end_token_ids
    assert not set(other_tokens[:-1]) & tokenizer.end_token_ids
    assert len(after) == 3


async def test_aclose_with_generations_running_finishes_cleanly(test_model_dir: Path) -> None:
    backend = CT2Backend.from_directory(
        test_model_dir, compute_type="int8", batching=BatchingOptions(batch_wait_ms=0)
    )
    await backend.load()
    generator = backend.generator
    ids = chat_ids(backend.tokenizer, "Tell me a long story about a dragon.")
    errors: list[str] = []
    started = trio.Semaphore(0)

    async def run(sampling: SamplingOptions) -> None:
        try:
            async with backend.generate(ids, 500, sampling) as stream:
                await stream.__anext__()
                started.release()
                async for _ in stream:
                    pass
        except BackendError as exc:
            errors.append(str(exc))

    async with trio.open_nursery() as nursery:
        # Two batch keys, both greedy: a sampled story could end before aclose().
        for penalty in (1.0, 1.0, 1.1):
            nursery.start_soon(run, SamplingOptions(repetition_penalty=penalty))
        for _ in range(3):
            await started.acquire()
        assert generator.num_active_batches >= 1
        await backend.aclose()
        # Returned only after every CTranslate2 batch ended.
        assert generator.num_active_batches == 0
    assert errors == ["the backend is shutting down"] * 3
    assert backend.stats().running == 0


async def test_a_seed_reproduces_sampling_only_on_a_fresh_worker(
    test_model_dir: Path,
) -> None:
    """See the seed notes in llm_local/backends/ct2/decode.py."""
    seeded = SamplingOptions(temperature=1.0, seed=1234)

    async def two_seeded_runs() -> list[list[int]]:
        backend = CT2Backend.from_directory(
            test_model_dir, inter_threads=1, batching=BatchingOptions(batch_wait_ms=0)
        )
        await backend.load()
        ids = chat_ids(backend.tokenizer, "Tell me a story.")
        runs: list[list[int]] = []
        for _ in range(2):
            async with backend.generate(ids, 6, seeded) as stream:
                runs.append([token async for group in stream for token in group])
        await backend.aclose()
        return runs

    first_process_like, second_process_like = await two_seeded_runs(), await two_seeded_runs()
    # A fresh worker thread: the same seed gives the same text.
    assert first_process_like[0] == second_process_like[0]
    # The same worker again: CTranslate2 does not reseed it, the text differs...
    assert first_process_like[1] != first_process_like[0]
    # ...though it continues the same sequence as in the other fresh backend.
    assert first_process_like[1] == second_process_like[1]


async def test_float32_greedy_after_a_merge_equals_each_request_alone(
    float32_model: LoadedModel,
) -> None:
    """A batch stopped to take newcomers in goes on where it stopped: same tokens."""
    events: list[BatchStarted] = []
    questions = [("Tell me a long story about a dragon.", 40), ("Name three colors.", 30)]
    async with serving(
        float32_model,
        events,
        batch_wait_ms=0,
        busy_batch_wait_ms=0,
        costs=FreeRestarts(),  # a restart always pays: no timing
    ) as backend:
        prompts = [(chat_ids(backend.tokenizer, text), limit) for text, limit in questions]
        prompts.append((chat_ids(backend.tokenizer, FRANCE), 12))

        async def tokens(index: int, first: trio.Event | None = None) -> list[int]:
            ids, limit = prompts[index]
            got: list[int] = []
            async with backend.generate(ids, limit, GREEDY) as stream:
                async for group in stream:
                    got.extend(group)
                    if first is not None:
                        first.set()
            return got

        alone = [await tokens(index) for index in range(3)]
        events.clear()
        together: dict[int, list[int]] = {}

        async def run(index: int, first: trio.Event | None = None) -> None:
            together[index] = await tokens(index, first)

        async with trio.open_nursery() as nursery:
            for index in (0, 1):  # one batch on each worker, both decoding
                first = trio.Event()
                nursery.start_soon(run, index, first)
                await first.wait()
            nursery.start_soon(run, 2)  # no worker free: a young batch is stopped
    assert [(event.size, event.resumed) for event in events] == [(1, 0), (1, 0), (2, 1)]
    assert [together[index] for index in range(3)] == alone
