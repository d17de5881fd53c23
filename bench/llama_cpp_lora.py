"""LoRA adapters in the llama_cpp backend, in process: 16 streams with 4 adapters in the mix
against the base model alone (issue 25's goal: the mix at >= 0.8x the base's tokens/s).

`python -m bench.llama_cpp_lora [STREAMS] [NEW_TOKENS] [BACKEND]` (default 16 streams, 64
tokens, llama_cpp; `transformers` measures that backend, which mixes adapters per token): the
suite's two test adapters (tests/lora_adapters.py, made first if missing) are configured
under four ids (two each: four distinct llama.cpp adapters, so every switch between them
is real), the backend is loaded once per variant from the test settings (the SmolLM2 GGUF),
and every stream decodes NEW_TOKENS greedy tokens of one prompt. Variants, side by side in
one run: "base" (every stream on the base model), "mix" (streams assigned in turn to the
base and the four adapters: five groups, which llama.cpp decodes one per step and
transformers in one step). Printed:
aggregate tokens/s of each and the ratio. `make bench` runs it as the scenario `lora`.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import trio

from bench import served
from bench.report import render_text_table
from bench.studies import LORA_COLUMNS, LoraRun, lora_rows
from llm_local.backends.base import Backend
from llm_local.backends.llama_cpp.backend import LlamaCppBackend
from llm_local.backends.llama_cpp.loader import plan_from_settings
from llm_local.backends.shared.source import resolve_model_source
from llm_local.core.prompt import prepare_prompt
from llm_local.core.types import GenerationHints, GenerationRequest, SamplingOptions
from llm_local.settings.loader import load_settings
from llm_local.settings.schema import AdapterSettings, AppSettings
from tests.lora_adapters import ensure_test_adapters

PROMPT = "Write the numbers from 1 to 1000, separated by commas."
ADAPTER_IDS = ("pirate-a", "robot-a", "pirate-b", "robot-b")


@contextmanager
def no_end_tokens() -> Iterator[None]:
    """Every stream decodes exactly NEW_TOKENS tokens: the tokenizers mark no end token
    while a variant runs. The test adapters answer in a few tokens and stop, so with the
    end honoured the mix would generate fewer tokens than the base in about the same wall
    time (its base streams decoding alone at the end), and the ratio would measure that,
    not what a mixed step costs."""
    from llm_local.backends.hf_tokenizer import HFTokenizer
    from llm_local.backends.llama_cpp.tokenizer import LlamaVocabTokenizer
    from llm_local.backends.shared import grammar

    saved = [(cls, cls.__dict__["end_token_ids"]) for cls in (HFTokenizer, LlamaVocabTokenizer)]
    available = grammar.available
    try:
        for cls, _ in saved:
            cls.end_token_ids = property(lambda self: frozenset())
        # Structured output's engine needs the end tokens; the bench asks for no structure.
        grammar.available = lambda: False
        yield
    finally:
        grammar.available = available
        for cls, original in saved:
            cls.end_token_ids = original


def load_backend(name: str, settings: AppSettings) -> Backend:
    if name == "transformers":
        from llm_local.backends.transformers.backend import TransformersBackend
        from llm_local.backends.transformers.loader import (
            plan_from_settings as transformers_plan,
        )

        return TransformersBackend(lambda: transformers_plan(settings), settings.transformers)
    return LlamaCppBackend(lambda: plan_from_settings(settings))


async def run(streams: int, new_tokens: int, mix: bool, backend_name: str = "llama_cpp") -> float:
    with no_end_tokens():
        return await _run(streams, new_tokens, mix, backend_name)


async def _run(streams: int, new_tokens: int, mix: bool, backend_name: str) -> float:
    settings = load_settings(env="test", overrides=served.backend_defaults())
    source = resolve_model_source(settings.model)
    assert source.path is not None
    made = ensure_test_adapters(settings.model.cache_dir, source)
    paths = [made["pirate"].path, made["robot"].path] * 2
    adapters = tuple(AdapterSettings(i, str(p)) for i, p in zip(ADAPTER_IDS, paths, strict=True))
    settings = dataclasses.replace(settings, adapters=adapters)
    backend = load_backend(backend_name, settings)
    await backend.load()
    ids = prepare_prompt(
        GenerationRequest(user_prompt=PROMPT), backend.tokenizer, backend.info.context_limit
    ).ids
    groups: list[str | None] = [None, *ADAPTER_IDS] if mix else [None]
    counts = [0] * streams

    async def stream(index: int) -> None:
        hints = GenerationHints(adapter=groups[index % len(groups)])
        async with backend.generate(ids, new_tokens, SamplingOptions(), hints) as tokens:
            async for group in tokens:
                counts[index] += len(group)

    # Warm up: the first decode after a load pays one-off costs (buffers, pages) that
    # would otherwise count against whichever variant runs first.
    async with backend.generate(ids, 1, SamplingOptions(), GenerationHints()) as warm:
        async for _ in warm:
            pass
    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for index in range(streams):
            nursery.start_soon(stream, index)
    elapsed = time.perf_counter() - started
    await backend.aclose()
    assert counts == [new_tokens] * streams, counts  # every stream decoded to the end
    return sum(counts) / elapsed


def measure(streams: int, new_tokens: int, backend: str = "llama_cpp") -> LoraRun:
    """The base alone, then the mix, each on a freshly loaded backend."""
    base = trio.run(run, streams, new_tokens, False, backend)
    mix = trio.run(run, streams, new_tokens, True, backend)
    return LoraRun(streams=streams, new_tokens=new_tokens, base_tps=base, mix_tps=mix)


def main(argv: list[str]) -> None:
    streams = int(argv[0]) if argv else 16
    new_tokens = int(argv[1]) if len(argv) > 1 else 64
    backend = argv[2] if len(argv) > 2 else "llama_cpp"
    print(backend, flush=True)
    run_ = measure(streams, new_tokens, backend)
    print(render_text_table(lora_rows([run_]), LORA_COLUMNS), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
