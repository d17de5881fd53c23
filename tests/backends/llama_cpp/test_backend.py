"""The llama_cpp backend on the real SmolLM2 GGUF (the file the test settings serve), driven
through core's generation: answers, streams joining a running batch, cancellation."""

from __future__ import annotations

import dataclasses
import re
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

import pytest
import trio

from llm_local.backends.llama_cpp.backend import LlamaCppBackend
from llm_local.backends.llama_cpp.library import ModelOptions, library, model_params
from llm_local.backends.llama_cpp.loader import SourceNotServed, plan_from_settings
from llm_local.backends.llama_cpp.scheduler import StepShape
from llm_local.core.prompt import prepare_prompt
from llm_local.core.types import (
    Finished,
    FinishReason,
    GenerationRequest,
    SamplingOptions,
)
from llm_local.settings.loader import load_settings
from llm_local.settings.schema import AppSettings
from tests.backends.generation import answer_text
from tests.hub_cache import hub_cache

pytestmark = pytest.mark.model

FRANCE = "What is the capital of France? Answer in one sentence."
# Greedy SmolLM2 counts on and on: a generation that outlives any test's patience.
ENDLESS = "Write the numbers from 1 to 1000, separated by commas."
GREEDY = SamplingOptions()


def settings(**llama_cpp: object) -> AppSettings:
    loaded = load_settings(env="test")
    options = dataclasses.replace(
        loaded.llama_cpp, **{"kv_cache_tokens": 8192, "sequences": 10, **llama_cpp}
    )
    return dataclasses.replace(loaded, llama_cpp=options)


class Steps:
    """What the worker fed at each step (written on its thread)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._steps: list[StepShape] = []

    def __call__(self, step: StepShape) -> None:
        with self._lock:
            self._steps.append(step)

    def snapshot(self) -> list[StepShape]:
        with self._lock:
            return list(self._steps)


@pytest.fixture
def steps() -> Steps:
    return Steps()


@pytest.fixture
async def backend(steps: Steps) -> AsyncIterator[LlamaCppBackend]:
    app_settings = settings()
    backend = LlamaCppBackend(lambda: plan_from_settings(app_settings), on_step=steps)
    await backend.load()
    yield backend
    await backend.aclose()


def prompt_ids(backend: LlamaCppBackend, question: str) -> tuple[int, ...]:
    request = GenerationRequest(user_prompt=question)
    return prepare_prompt(request, backend.tokenizer, backend.info.context_limit).ids


async def generate_text(
    backend: LlamaCppBackend, request: GenerationRequest
) -> tuple[str, Finished]:
    return await answer_text(backend, request)


async def test_greedy_answer_names_paris(backend: LlamaCppBackend) -> None:
    text, finished = await generate_text(
        backend, GenerationRequest(user_prompt=FRANCE, max_new_tokens=32)
    )

    assert "Paris" in text
    assert finished.reason == FinishReason.STOP
    assert finished.prompt_tokens == len(prompt_ids(backend, FRANCE))
    assert backend.info.backend == "llama_cpp"
    assert backend.info.compute_type == "q4_1"  # the GGUF's own weights, served as is
    assert backend.info.context_limit == 8192  # one request may use the whole pool


async def test_the_length_cut_ends_the_stream(backend: LlamaCppBackend) -> None:
    _, finished = await generate_text(
        backend, GenerationRequest(user_prompt=ENDLESS, max_new_tokens=5)
    )

    assert finished.reason == FinishReason.LENGTH
    assert finished.completion_tokens == 5


async def test_the_tokenizer_is_the_gguf_s_own_with_its_chat_template(
    backend: LlamaCppBackend,
) -> None:
    tokenizer = backend.tokenizer
    assert tokenizer.chat_template is not None and "<|im_start|>" in tokenizer.chat_template
    ids = tokenizer.encode("<|im_start|>user\nHello<|im_end|>")
    assert ids[0] in tokenizer.encode("<|im_start|>")  # parsed as one special token
    assert tokenizer.encode("<|im_end|>")[0] in tokenizer.end_token_ids
    assert tokenizer.decode(ids) == "user\nHello"  # special tokens give no text
    assert tokenizer.plain_prompt_bos_id is None  # SmolLM2's GGUF asks for no bos


async def stream_tokens(
    backend: LlamaCppBackend,
    ids: Sequence[int],
    max_new_tokens: int,
    seen: list[int],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Generate, counting tokens into `seen[0]`; started once the first token arrived."""
    async with backend.generate(ids, max_new_tokens, GREEDY) as stream:
        started = False
        async for group in stream:
            seen[0] += len(group)
            if not started:
                started = True
                task_status.started()
    seen.append(-1)  # finished


async def test_a_newcomer_joins_eight_running_streams_before_any_finishes(
    backend: LlamaCppBackend, steps: Steps
) -> None:
    ids = prompt_ids(backend, ENDLESS)
    runners = [[0] for _ in range(8)]
    async with trio.open_nursery() as nursery:
        for seen in runners:
            await nursery.start(stream_tokens, backend, ids, 400, seen)
        newcomer = [0]
        await nursery.start(stream_tokens, backend, prompt_ids(backend, FRANCE), 8, newcomer)
        # The newcomer's first token came while all eight still decode (400 tokens each).
        assert all(seen[-1] != -1 for seen in runners)
        assert all(seen[0] < 400 for seen in runners)
        assert backend.stats().running >= 8
        nursery.cancel_scope.cancel()
    # It was decoded beside them: some step fed eight decoding tokens and its prompt.
    assert any(step.decoding >= 8 and step.prefill_tokens > 0 for step in steps.snapshot())


async def test_a_cancelled_stream_leaves_the_batch_within_one_step(
    backend: LlamaCppBackend, steps: Steps
) -> None:
    ids = prompt_ids(backend, ENDLESS)
    kept, cancelled = [0], [0]
    async with trio.open_nursery() as nursery:
        await nursery.start(stream_tokens, backend, ids, 1000, kept)
        nursery.start_soon(cancel_after_tokens, backend, ids, cancelled, 3)
        await wait_for(lambda: cancelled[-1] == -1)  # it left its stream
        left_at = len(steps.snapshot())
        await wait_for(lambda: len(steps.snapshot()) >= left_at + 3)
        after = steps.snapshot()[left_at + 1 :]
        assert after and all(step.decoding == 1 for step in after)
        assert backend.stats().running == 1
        nursery.cancel_scope.cancel()
    await wait_for(lambda: backend.stats().running == 0)


async def cancel_after_tokens(
    backend: LlamaCppBackend,
    ids: Sequence[int],
    seen: list[int],
    count: int,
) -> None:
    with trio.CancelScope() as scope:
        async with backend.generate(ids, 1000, GREEDY) as stream:
            async for group in stream:
                seen[0] += len(group)
                if seen[0] >= count:
                    scope.cancel()
    seen.append(-1)


async def wait_for(condition: Callable[[], bool]) -> None:
    """Poll: what it waits for happens on the worker thread, which has no trio event."""
    with trio.fail_after(60):
        while not condition():  # noqa: ASYNC110
            await trio.sleep(0.01)


@pytest.mark.parametrize(
    "cut",
    [SamplingOptions(top_k=40, top_p=0.95), SamplingOptions(top_k=0, top_p=1.0)],
    ids=["top-k and top-p", "no cut"],
)
async def test_a_seeded_sample_repeats_and_greedy_ignores_the_seed(
    backend: LlamaCppBackend, cut: SamplingOptions
) -> None:
    ids = prompt_ids(backend, "Tell me a story.")
    sampled = dataclasses.replace(cut, temperature=1.0, seed=7)

    async def run(sampling: SamplingOptions) -> list[int]:
        tokens: list[int] = []
        async with backend.generate(ids, 12, sampling) as stream:
            async for group in stream:
                tokens.extend(group)
        return tokens

    # One at a time: the same batch shape, so the same logits.
    first, second = await run(sampled), await run(sampled)
    assert first == second
    other = await run(dataclasses.replace(sampled, seed=8))
    assert other != first


def test_weight_repacking_is_off_unless_asked_for() -> None:
    lib = library()
    assert settings().llama_cpp.repack is False
    assert model_params(lib, ModelOptions(gpu_layers=0, repack=False)).use_extra_bufts is False
    assert model_params(lib, ModelOptions(gpu_layers=0, repack=True)).use_extra_bufts is True


async def test_the_loaded_model_was_given_repacking_off(backend: LlamaCppBackend) -> None:
    # What the library received (the struct is passed by value: this is that value).
    handle = backend._loaded().handle
    assert handle.model_params.use_extra_bufts is False


def test_a_model_directory_is_refused_naming_the_backends_that_serve_it(
    tmp_path: Path,
) -> None:
    directory = Path(str(tmp_path))
    (directory / "config.json").write_text("{}")
    app = settings()
    app = dataclasses.replace(app, model=dataclasses.replace(app.model, name=str(directory)))
    with pytest.raises(SourceNotServed, match='backend = "ct2"'):
        plan_from_settings(app)


def hub_settings(repo_id: str, download_dir: Path) -> AppSettings:
    app = settings()
    model = dataclasses.replace(
        app.model, name=repo_id, download_dir=download_dir, offline=True, revision=None
    )
    return dataclasses.replace(app, model=model)


async def test_a_hub_repository_holding_one_gguf_is_served_from_the_hub_cache(
    tmp_path: Path,
) -> None:
    """The third source kind: a hub repository id whose one .gguf file is found (here in
    the hub cache, offline: no network in tests) and served as is."""
    gguf = plan_from_settings(settings()).gguf
    cache = hub_cache(tmp_path, "acme/smollm2-gguf", {"smollm2.Q4_1.gguf": gguf})
    app = hub_settings("acme/smollm2-gguf", cache)
    plan = plan_from_settings(app)
    assert plan.gguf.name == "smollm2.Q4_1.gguf" and plan.gguf.resolve() == gguf.resolve()
    hub_backend = LlamaCppBackend(lambda: plan)
    await hub_backend.load()
    try:
        text, finished = await generate_text(
            hub_backend, GenerationRequest(user_prompt=FRANCE, max_new_tokens=12)
        )
    finally:
        await hub_backend.aclose()
    assert "Paris" in text and finished.completion_tokens > 0


def test_a_hub_repository_with_several_ggufs_is_refused_naming_them(tmp_path: Path) -> None:
    gguf = plan_from_settings(settings()).gguf
    files = {"model.Q4_1.gguf": gguf, "model.Q8_0.gguf": gguf}
    cache = hub_cache(tmp_path, "acme/two-ggufs", files)
    with pytest.raises(SourceNotServed, match=re.escape("model.Q4_1.gguf, model.Q8_0.gguf")):
        plan_from_settings(hub_settings("acme/two-ggufs", cache))
