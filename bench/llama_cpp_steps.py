"""The llama_cpp backend in process: streams, aggregate tokens/s, a late newcomer's TTFT.

`python -m bench.llama_cpp_steps STREAMS:CHUNK ...` (e.g. `1:64 8:16 8:64 8:256`): for each
pair, the backend is loaded with `prefill_chunk_tokens = CHUNK` from the test settings
(the SmolLM2 GGUF), STREAMS greedy streams of 128 tokens start together, and (with more
than one stream) one second later a newcomer with a ~435-token prompt arrives. Printed:
aggregate tokens/s (prefill included), the streams' first and last TTFT, the newcomer's
TTFT. It measures the chunk
trade-off: a larger chunk feeds the newcomer faster and slows the running streams' steps.
"""

from __future__ import annotations

import dataclasses
import sys
import time

import trio

from bench import served
from llm_local.backends.llama_cpp.backend import LlamaCppBackend
from llm_local.backends.llama_cpp.loader import plan_from_settings
from llm_local.core.prompt import prepare_prompt
from llm_local.core.types import GenerationRequest, SamplingOptions
from llm_local.settings.loader import load_settings

ENDLESS = "Write the numbers from 1 to 1000, separated by commas."
LONG = "Summarise this: " + " ".join(["The quick brown fox jumps over the lazy dog."] * 40)
NEW_TOKENS = 128
NEWCOMER_AFTER_S = 1.0


async def run(streams: int, chunk: int) -> str:
    settings = load_settings(env="test", overrides=served.backend_defaults())
    options = dataclasses.replace(settings.llama_cpp, prefill_chunk_tokens=chunk)
    settings = dataclasses.replace(settings, llama_cpp=options)
    backend = LlamaCppBackend(lambda: plan_from_settings(settings))
    await backend.load()
    limit = backend.info.context_limit
    ids = prepare_prompt(GenerationRequest(user_prompt=ENDLESS), backend.tokenizer, limit).ids
    late_ids = prepare_prompt(GenerationRequest(user_prompt=LONG), backend.tokenizer, limit).ids
    counts = [0] * streams
    ttft = [0.0] * streams
    newcomer: list[float] = []

    async def stream(index: int) -> None:
        start = time.perf_counter()
        async with backend.generate(ids, NEW_TOKENS, SamplingOptions()) as tokens:
            async for group in tokens:
                if counts[index] == 0:
                    ttft[index] = time.perf_counter() - start
                counts[index] += len(group)

    async def late() -> None:
        await trio.sleep(NEWCOMER_AFTER_S)
        start = time.perf_counter()
        async with backend.generate(late_ids, 4, SamplingOptions()) as tokens:
            async for _ in tokens:
                if not newcomer:
                    newcomer.append(time.perf_counter() - start)

    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for index in range(streams):
            nursery.start_soon(stream, index)
        if streams > 1:  # one stream alone: its own speed, nobody joining
            nursery.start_soon(late)
    elapsed = time.perf_counter() - started
    threads = backend.info.threads
    await backend.aclose()
    return (
        f"streams={streams} chunk={chunk} threads={threads[1] if threads else '?'} "
        f"tokens/s={sum(counts) / elapsed:.1f} ttft first/last={min(ttft) * 1000:.0f}/"
        f"{max(ttft) * 1000:.0f} ms newcomer ({len(late_ids)} prompt tokens) "
        f"ttft={newcomer[0] * 1000 if newcomer else float('nan'):.0f} ms"
    )


def main(argv: list[str]) -> None:
    for spec in argv or ["1:64", "8:64"]:
        streams, chunk = (int(part) for part in spec.split(":"))
        print(trio.run(run, streams, chunk), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
