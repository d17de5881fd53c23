"""Do kept idle sequences slow other requests down in the llama_cpp backend?

`python -m bench.llama_cpp_idle_cells [--others 7] [--history 600] [--rounds 3]`: one call's
history (`--history` tokens) is read once, then its next turns (the history plus about 20
new tokens, 16 greedy tokens each) are timed alone, then again after `--others` other
calls' histories of the same length were read and kept as idle sequences. With prefix
reuse every timed turn reads only its new tokens, so any difference is what the other
sequences' cells cost: in llama.cpp's unified KV cache one attention spans the cells of
every sequence, masked (issue 22: 8 concurrent calls grew slower turn by turn).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence

import trio

from bench import served
from llm_local.backends.llama_cpp.backend import LlamaCppBackend
from llm_local.backends.llama_cpp.loader import plan_from_settings
from llm_local.core.types import SamplingOptions
from llm_local.settings.loader import load_settings

GREEDY = SamplingOptions(temperature=0.0)


async def timed(backend: LlamaCppBackend, ids: Sequence[int], max_new: int) -> tuple[float, float]:
    """(seconds to the first token, seconds per later token)."""
    started = time.perf_counter()
    first: float | None = None
    count = 0
    async with backend.generate(ids, max_new, GREEDY) as stream:
        async for group in stream:
            if first is None:
                first = time.perf_counter() - started
            count += len(group)
    total = time.perf_counter() - started
    assert first is not None
    return first, (total - first) / max(1, count - 1)


async def measure(others: int, history: int, rounds: int) -> dict[str, list[tuple[float, float]]]:
    backend = LlamaCppBackend(
        lambda: plan_from_settings(load_settings(env="test", overrides=served.backend_defaults()))
    )
    await backend.load()
    encode = backend.tokenizer.encode
    try:
        base = list(
            encode(" ".join(f"Line {i}: order {1000 + i} and its delivery." for i in range(90)))
        )
        base = base[:history]
        await timed(backend, base, 1)
        found: dict[str, list[tuple[float, float]]] = {"alone": [], f"{others} idle beside": []}
        turn = 0

        async def turns(label: str) -> None:
            nonlocal turn
            for _ in range(rounds):
                turn += 1
                line = encode(f" Question {turn}: when does order {turn} arrive, and its price?")
                found[label].append(await timed(backend, [*base, *line[:20]], 16))

        await turns("alone")
        for other in range(others):
            notes = " ".join(
                f"Shop {other} note {i}: customer {i} wants a refund." for i in range(90)
            )
            await timed(backend, list(encode(notes))[:history], 1)
        await turns(f"{others} idle beside")
    finally:
        await backend.aclose()
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--others", type=int, default=7)
    parser.add_argument("--history", type=int, default=600)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    found = trio.run(measure, args.others, args.history, args.rounds)
    for label, rows in found.items():
        ttft = statistics.median(first for first, _ in rows) * 1000
        step = statistics.median(step for _, step in rows) * 1000
        print(f"{label}: TTFT p50 {ttft:.0f} ms, per token p50 {step:.1f} ms ({len(rows)} turns)")


if __name__ == "__main__":
    main()
