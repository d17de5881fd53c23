"""The CTranslate2 backend on the real SmolLM2 model, driven through core's generation."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio

from llm_local.backends.base import BackendError, BackendLoadError
from llm_local.backends.ct2 import BatchingOptions, CT2Backend
from llm_local.backends.ct2.decode import sampling_arguments
from llm_local.backends.ct2.loader import LoadedModel, read_context_limit
from llm_local.backends.shared.context import DEFAULT_CONTEXT_LIMIT
from llm_local.core.generation import run_generation
from llm_local.core.prompt import prepare_prompt
from llm_local.core.types import (
    Finished,
    FinishReason,
    GenerationRequest,
    SamplingOptions,
    TextChunk,
)

from .conftest import FRANCE, chat_ids

STORY = "Tell me a long story about a dragon who learns to cook."


@pytest.fixture
async def backend(float32_model: LoadedModel) -> AsyncIterator[CT2Backend]:
    # float32: these tests read answer text, which int8's greedy near-ties make depend on
    # the CPU (docs/FINDINGS.md).
    backend = CT2Backend.from_loaded(float32_model, batching=BatchingOptions(batch_wait_ms=0))
    await backend.load()
    yield backend
    await backend.aclose()


async def generate_text(
    backend: CT2Backend, request: GenerationRequest
) -> tuple[str, Finished, list[TextChunk]]:
    prepared = prepare_prompt(request, backend.tokenizer, backend.info.context_limit)
    chunks: list[TextChunk] = []

    async def on_text(chunk: TextChunk) -> None:
        chunks.append(chunk)

    finished = await run_generation(backend, request, prepared, on_text)
    return "".join(chunk.text for chunk in chunks), finished, chunks


@pytest.mark.model
async def test_greedy_answer_names_paris(backend: CT2Backend) -> None:
    text, finished, _ = await generate_text(
        backend, GenerationRequest(user_prompt=FRANCE, max_new_tokens=32)
    )
    assert "Paris" in text
    assert finished.reason is FinishReason.STOP  # the model's <|im_end|> ended it
    assert finished.prompt_tokens == len(chat_ids(backend.tokenizer, FRANCE))


@pytest.mark.model
async def test_max_new_tokens_gives_exactly_that_many_tokens(backend: CT2Backend) -> None:
    text, finished, chunks = await generate_text(
        backend, GenerationRequest(user_prompt=STORY, max_new_tokens=5)
    )
    assert finished.reason is FinishReason.LENGTH
    assert finished.completion_tokens == 5
    assert sum(chunk.token_count for chunk in chunks) == 5
    assert text


@pytest.mark.model
async def test_backend_stream_ends_after_max_new_tokens_ids(backend: CT2Backend) -> None:
    ids: list[int] = []
    async with backend.generate(chat_ids(backend.tokenizer, STORY), 5, SamplingOptions()) as s:
        async for group in s:
            ids.extend(group)
    assert len(ids) == 5


@pytest.mark.model
async def test_a_stop_sequence_cuts_the_text_before_it(backend: CT2Backend) -> None:
    text, finished, _ = await generate_text(
        backend,
        GenerationRequest(user_prompt=FRANCE, max_new_tokens=32, stop_sequences=(" is",)),
    )
    assert text == "The capital of France"
    assert finished.reason is FinishReason.STOP


class CountingSteps:
    """The real Generator, counting the token callbacks CTranslate2 makes, and those it
    still makes after the backend's callback asked it to stop."""

    def __init__(self, generator: Any) -> None:
        self._generator = generator
        self.steps = 0
        self.stop_requested = False
        self.steps_after_stop = 0

    def generate_batch(self, prompts: list[list[str]], **kwargs: Any) -> Any:
        callback = kwargs.pop("callback")

        def counting(step: Any) -> bool:
            self.steps += 1
            if self.stop_requested:
                self.steps_after_stop += 1
            stop = bool(callback(step))
            self.stop_requested = self.stop_requested or stop
            return stop

        return self._generator.generate_batch(prompts, callback=counting, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._generator, name)


@pytest.mark.model
async def test_cancelling_after_three_tokens_frees_ctranslate2_within_one_step(
    float32_model: LoadedModel,
) -> None:
    # Counted in decoding steps, not milliseconds: how long a step takes depends on the
    # machine and its load; that the step after the cancel is the last one does not.
    counting = CountingSteps(float32_model.generator)
    model = LoadedModel(
        generator=counting, tokenizer=float32_model.tokenizer, info=float32_model.info
    )
    backend = CT2Backend.from_loaded(model, batching=BatchingOptions(batch_wait_ms=0))
    await backend.load()
    request = GenerationRequest(user_prompt=STORY, max_new_tokens=400)
    prepared = prepare_prompt(request, backend.tokenizer, backend.info.context_limit)
    tokens_seen = 0
    active_when_cancelled = -1

    with trio.CancelScope() as scope:

        async def on_text(chunk: TextChunk) -> None:
            nonlocal tokens_seen, active_when_cancelled
            tokens_seen += chunk.token_count
            if tokens_seen >= 3 and not scope.cancel_called:
                active_when_cancelled = counting.num_active_batches
                scope.cancel()

        await run_generation(backend, request, prepared, on_text)

    assert scope.cancelled_caught
    assert active_when_cancelled == 1  # it was decoding when the consumer left
    # A bound against hanging only; what is asserted is counted below.
    with trio.fail_after(60):
        # CTranslate2 offers no event for this: poll.
        while counting.num_active_batches:  # noqa: ASYNC110
            await trio.sleep(0.001)
    # The first step after the cancel asked CTranslate2 to stop, and it made no other.
    assert counting.stop_requested
    assert counting.steps_after_stop == 0
    assert counting.steps < request.max_new_tokens
    assert backend.stats().running == 0
    await backend.aclose()


@pytest.mark.model
async def test_end_tokens_include_the_chat_end_of_turn(backend: CT2Backend) -> None:
    end_of_turn = backend.tokenizer.encode("<|im_end|>")
    assert len(end_of_turn) == 1
    assert end_of_turn[0] in backend.tokenizer.end_token_ids


def test_sampling_options_become_generate_batch_arguments() -> None:
    assert sampling_arguments(SamplingOptions(temperature=0.0, top_k=40)) == {
        "sampling_topk": 1,
        "sampling_topp": 1.0,
        "sampling_temperature": 1.0,
        "repetition_penalty": 1.0,
    }
    options = SamplingOptions(temperature=0.7, top_k=40, top_p=0.9, repetition_penalty=1.2)
    assert sampling_arguments(options) == {
        "sampling_topk": 40,
        "sampling_topp": 0.9,
        "sampling_temperature": 0.7,
        "repetition_penalty": 1.2,
    }


@pytest.mark.model
async def test_load_from_directory_reports_the_model_and_closes(test_model_dir: Path) -> None:
    backend = CT2Backend.from_directory(
        test_model_dir, compute_type="int8", model_name="smollm2", context_limit=4096
    )
    await backend.load()
    assert backend.info.backend == "ct2"
    assert backend.info.model_name == "smollm2"
    assert backend.info.device == "cpu"
    assert backend.info.compute_type.startswith("int8")
    assert backend.info.context_limit == 4096
    await backend.aclose()
    with pytest.raises(BackendError, match="not loaded"):
        _ = backend.generator
    with pytest.raises(BackendError, match="closed"):
        async with backend.generate([1, 2], 3, SamplingOptions()):
            pass


async def test_loading_a_directory_without_a_model_names_the_problem(tmp_path: Path) -> None:
    backend = CT2Backend.from_directory(tmp_path)
    with pytest.raises(BackendLoadError, match=r"holds no converted model \(model\.bin\)"):
        await backend.load()


async def test_an_unconverted_model_in_settings_says_to_convert(tmp_path: Path) -> None:
    from llm_local.backends.ct2 import create_backend
    from llm_local.settings.loader import load_settings

    settings = load_settings(env="test", overrides={"model.cache_dir": str(tmp_path)})
    backend = create_backend(settings)
    with pytest.raises(BackendLoadError, match=r"run `llm-local convert`") as caught:
        await backend.load()
    assert f"not converted in {tmp_path}" in str(caught.value)


@pytest.mark.model
async def test_settings_pick_the_converted_model_and_its_runtime() -> None:
    from llm_local.backends.ct2 import create_backend
    from llm_local.settings.loader import load_settings

    settings = load_settings(env="test", overrides={"runtime.compute_type": "float32"})
    backend = create_backend(settings)
    await backend.load()
    try:
        assert backend.info.model_name == settings.model.name
        assert backend.info.compute_type == "float32"
        # One replica more than the workers, for the extra lane a TTFT target brings.
        assert settings.runtime.ttft_target_ms > 0
        assert backend.generator.num_generators == settings.runtime.inter_threads + 1
    finally:
        await backend.aclose()


def test_context_limit_comes_from_manifest_then_config_else_falls_back(tmp_path: Path) -> None:
    assert read_context_limit(tmp_path) == DEFAULT_CONTEXT_LIMIT
    (tmp_path / "config.json").write_text('{"max_position_embeddings": 4096}')
    assert read_context_limit(tmp_path) == 4096
    (tmp_path / "manifest.json").write_text('{"model": {"context_length": 8192}}')
    assert read_context_limit(tmp_path) == 8192


@pytest.mark.model
def test_the_process_exits_cleanly_after_generating(test_model_dir: Path) -> None:
    # FINDINGS: once a process aborted at exit ("terminate called without an active
    # exception") after generating. A real process, closed by aclose, exits with 0.
    script = textwrap.dedent(
        f"""
        import trio
        from llm_local.backends.ct2 import CT2Backend
        from llm_local.core.types import SamplingOptions

        async def main():
            backend = CT2Backend.from_directory({str(test_model_dir)!r})
            await backend.load()
            ids = backend.tokenizer.encode("<|im_start|>user\\nHi<|im_end|>\\n")
            async with trio.open_nursery() as nursery:
                for _ in range(3):
                    nursery.start_soon(drain, backend, ids)
                await trio.sleep(0.05)
                await backend.aclose()

        async def drain(backend, ids):
            try:
                async with backend.generate(ids, 500, SamplingOptions(temperature=1.0)) as s:
                    async for _ in s:
                        pass
            except Exception as exc:
                print(type(exc).__name__, exc)

        trio.run(main)
        print("done")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "terminate called" not in result.stderr
    assert result.stdout.splitlines()[-1] == "done"
