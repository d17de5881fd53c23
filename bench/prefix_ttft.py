"""Time to first token with a long shared system prompt, with and without the prefix cache.

`python -m bench.prefix_ttft [--rounds N] [--concurrency 1,4]`: the in-process CT2
backend on the converted test model (int8, two workers), a ~300-token persona as the
system prompt, short distinct user turns. The two setups run on one loaded model,
alternating round by round, so both see the same machine; the output is the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import trio

from llm_local.backends.ct2 import BatchingOptions, CT2Backend
from llm_local.backends.ct2.loader import LoadPlan, load_model
from llm_local.core.generation import run_generation
from llm_local.core.prompt import prepare_prompt
from llm_local.core.types import GenerationRequest, TextChunk

PERSONA = (
    "You are Ada, the voice assistant of the Northwind Savings Bank. You answer callers "
    "politely and briefly, in one or two sentences, without lists or markdown. You never "
    "ask for a full card number, a PIN or a password, and you never read out account "
    "numbers. If a caller wants to block a card, report fraud or dispute a payment, tell "
    "them you will transfer them to an agent and ask them to stay on the line. Branches "
    "are open from 8 to 18 on weekdays and from 9 to 13 on Saturdays; the phone line is "
    "open every day from 7 to 22. Transfers between the caller's own accounts are free; "
    "transfers to other banks cost one euro and arrive the next working day. Savings "
    "accounts pay 2.1 percent a year, paid monthly. A new card arrives within five "
    "working days. If you do not know an answer, say so and offer to transfer the caller. "
    "Speak in the caller's language. Keep every answer under forty words."
)
TURNS = [
    "When are you open on Saturday?",
    "How much does a transfer cost?",
    "What interest do savings pay?",
    "How long does a new card take?",
    "Can I speak to someone about a payment?",
    "Do you open on Sunday?",
    "Is the phone line open at 21?",
    "What is my PIN?",
]


async def _ttft(backend: CT2Backend, user_prompt: str) -> float:
    request = GenerationRequest(user_prompt=user_prompt, system_prompt=PERSONA, max_new_tokens=8)
    prepared = prepare_prompt(request, backend.tokenizer, backend.info.context_limit)
    started = time.perf_counter()
    first: list[float] = []

    async def on_text(chunk: TextChunk) -> None:
        if not first:
            first.append(time.perf_counter() - started)

    await run_generation(backend, request, prepared, on_text)
    return first[0] if first else time.perf_counter() - started


async def _round(backend: CT2Backend, concurrency: int, offset: int) -> list[float]:
    results: list[float] = []

    async def one(index: int) -> None:
        results.append(await _ttft(backend, TURNS[(offset + index) % len(TURNS)]))

    async with trio.open_nursery() as nursery:
        for index in range(concurrency):
            nursery.start_soon(one, index)
    return results


async def _main(model_dir: Path, rounds: int, levels: list[int]) -> None:
    model = load_model(
        LoadPlan(
            model_dir=model_dir,
            model_name=model_dir.name,
            device="cpu",
            device_index=0,
            compute_type="int8",
            inter_threads=2,
            intra_threads=1,
            context_limit=0,
        )
    )
    backends = {
        "cached": CT2Backend.from_loaded(model, batching=BatchingOptions(prefix_cache_mb=512)),
        "uncached": CT2Backend.from_loaded(model, batching=BatchingOptions(prefix_cache_mb=0)),
    }
    for backend in backends.values():
        await backend.load()
    try:
        prepared = prepare_prompt(
            GenerationRequest(user_prompt=TURNS[0], system_prompt=PERSONA),
            backends["cached"].tokenizer,
            2048,
        )
        print(
            f"prompt {len(prepared.ids)} tokens, shared system block "
            f"{prepared.shared_prefix_length}; {rounds} rounds per level, alternating"
        )
        for backend in backends.values():  # warm up: the cache admits on the second sight
            for _ in range(2):
                await _round(backend, 1, 0)
        for level in levels:
            ttfts: dict[str, list[float]] = {name: [] for name in backends}
            for round_index in range(rounds):
                for name, backend in backends.items():
                    ttfts[name].extend(await _round(backend, level, round_index))
            medians = {name: statistics.median(values) for name, values in ttfts.items()}
            print(
                f"{level} concurrent: TTFT p50 cached {medians['cached'] * 1000:.0f} ms, "
                f"uncached {medians['uncached'] * 1000:.0f} ms, "
                f"cached/uncached = {medians['cached'] / medians['uncached']:.2f}"
            )
    finally:
        for backend in backends.values():
            await backend.aclose()
        model.generator.unload_model()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--concurrency", default="1,4")
    parser.add_argument("--model-dir", type=Path, default=None)
    arguments = parser.parse_args()
    model_dir = arguments.model_dir
    if model_dir is None:
        from llm_local.convert.api import find_converted
        from llm_local.settings.loader import load_settings

        found = find_converted(load_settings(env="test"))
        if found is None:
            raise SystemExit("the ENV=test model is not converted: `ENV=test llm-local convert`")
        model_dir = Path(found)
    levels = [int(level) for level in arguments.concurrency.split(",")]
    trio.run(_main, model_dir, arguments.rounds, levels)


if __name__ == "__main__":
    main()
