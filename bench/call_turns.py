"""Phone calls turn by turn: time to first token against the turn number, prefix reuse on/off.

`python -m bench.call_turns [--calls 1,8] [--turns 12] [--think-s 1.0] [--max-new 40]
[--backends llama_cpp,transformers]`: each backend in process on the test GGUF (transformers
dequantizes it); each call a persona of its tenant (about 220
tokens), scripted caller lines, the answers fed back into the history and the whole history
resent every turn (as the gateway does), a think time between turns. The same calls run with
the backend's `prefix_cache_mb` at its default and at 0 (no reuse), one after the other on the
same machine; the table gives TTFT p50/p95 by turn, tokens reused and bytes held, and the
issue's goal: the last three turns' TTFT over the median of turns 1-3 (one call alone:
at most 1.5). `make bench` runs it as the scenario `call-turns` (bench/scenarios/call_turns.py:
the table, a plot of TTFT against the turn number, llama.cpp's server beside it when built).
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import time
from collections.abc import Sequence

import trio

from bench import served
from bench.config import CALL_BACKENDS
from bench.report import render_text_table
from bench.studies import TURN_SUMMARY_COLUMNS, TurnSeries, turn_summary_rows, turn_table
from llm_local.backends.base import Backend
from llm_local.core.generation import run_generation
from llm_local.core.prompt import prepare_prompt
from llm_local.core.types import ChatTurn, GenerationRequest, RequestContext, Role, TextChunk
from llm_local.settings.loader import load_settings

PERSONA = (
    "You are {name}, the voice assistant of {shop}. You answer callers politely and "
    "briefly, in one or two sentences, without lists or markdown. You never ask for a "
    "full card number, a PIN or a password. If a caller wants to complain, tell them you "
    "will transfer them to a colleague and ask them to stay on the line. The shop is open "
    "from 8 to 18 on weekdays and from 9 to 13 on Saturdays; the phone line is open every "
    "day from 7 to 22. Delivery costs five euros and is free above fifty euros; it arrives "
    "within two working days. Returns are accepted within thirty days with the receipt. "
    "Gift cards are sold in the shop and online, from ten to two hundred euros. If you do "
    "not know an answer, say so and offer to transfer the caller. Speak in the caller's "
    "language. Keep every answer under forty words, and never invent prices or dates."
)
SHOPS = [("Ada", "the Northwind bakery"), ("Ben", "Harbor Books"), ("Cleo", "Green Garage")]
LINES = [
    "Hello, are you open on Saturday?",
    "How much does delivery cost?",
    "And when would it arrive?",
    "Can I return something I bought last week?",
    "Do you sell gift cards?",
    "What is the largest amount for a gift card?",
    "Is the phone line open on Sundays?",
    "I would like to complain about an order.",
    "Thanks. Can you repeat your opening hours?",
    "Do I need the receipt for a return?",
    "Is delivery free for a sixty euro order?",
    "Thank you, goodbye.",
]


def caller_line(turn: int) -> str:
    return LINES[turn % len(LINES)]


def persona(index: int) -> tuple[str, str]:
    """Call `index`'s (system prompt, tenant): one persona per tenant."""
    name, shop = SHOPS[index % len(SHOPS)]
    return PERSONA.format(name=name, shop=shop), f"tenant-{index % len(SHOPS)}"


BACKENDS = CALL_BACKENDS


def make_backend(name: str, budget_mb: float) -> Backend:
    """The test settings' `name` backend, with the defaults a user gets (threads, dtype:
    bench/served.py) and its prefix reuse budget at `budget_mb`."""
    loaded = load_settings(env="test", overrides=served.backend_defaults())
    if name == "llama_cpp":
        from llm_local.backends.llama_cpp.backend import LlamaCppBackend
        from llm_local.backends.llama_cpp.loader import plan_from_settings as llama_plan

        options = dataclasses.replace(loaded.llama_cpp, prefix_cache_mb=budget_mb)
        llama_settings = dataclasses.replace(loaded, llama_cpp=options)
        return LlamaCppBackend(lambda: llama_plan(llama_settings))
    if name == "transformers":
        from llm_local.backends.transformers.backend import TransformersBackend
        from llm_local.backends.transformers.loader import plan_from_settings as torch_plan

        torch_options = dataclasses.replace(loaded.transformers, prefix_cache_mb=budget_mb)
        torch_settings = dataclasses.replace(loaded, transformers=torch_options)
        return TransformersBackend(lambda: torch_plan(torch_settings), torch_options)
    raise ValueError(f"unknown backend {name!r}: one of {', '.join(BACKENDS)}")


def default_budget_mb(name: str) -> float:
    loaded = load_settings(env="test")
    options = loaded.llama_cpp if name == "llama_cpp" else loaded.transformers
    return options.prefix_cache_mb


async def run(
    calls: int,
    turns: int,
    think_s: float,
    max_new: int,
    budget_mb: float,
    variant: str,
    backend_name: str = "llama_cpp",
) -> TurnSeries:
    backend = make_backend(backend_name, budget_mb)
    await backend.load()
    ttft: dict[int, list[float]] = {turn: [] for turn in range(turns)}
    held = 0
    try:

        async def one_call(index: int) -> None:
            nonlocal held
            system, tenant = persona(index)
            history: list[ChatTurn] = []
            await trio.sleep(random.Random(index).uniform(0, think_s))
            for turn in range(turns):
                line = caller_line(turn)
                request = GenerationRequest(
                    user_prompt=line,
                    system_prompt=system,
                    history=tuple(history),
                    max_new_tokens=max_new,
                    context=RequestContext(request_id=f"{index}-{turn}", tenant_id=tenant),
                )
                started = time.perf_counter()
                first: list[float] = []
                pieces: list[str] = []

                async def on_text(
                    chunk: TextChunk,
                    started: float = started,
                    first: list[float] = first,
                    pieces: list[str] = pieces,
                ) -> None:
                    if not first:
                        first.append(time.perf_counter() - started)
                    pieces.append(chunk.text)

                prepared = prepare_prompt(request, backend.tokenizer, backend.info.context_limit)
                await run_generation(backend, request, prepared, on_text)
                ttft[turn].append(first[0] if first else float("nan"))
                held = max(held, backend.stats().prefix_cache_bytes)
                history += [ChatTurn(Role.USER, line), ChatTurn(Role.ASSISTANT, "".join(pieces))]
                await trio.sleep(think_s)

        async with trio.open_nursery() as nursery:
            for index in range(calls):
                nursery.start_soon(one_call, index)
        stats = backend.stats()
    finally:
        await backend.aclose()
    return TurnSeries(
        variant=variant,
        calls=calls,
        ttft_s=tuple(tuple(ttft[turn]) for turn in range(turns)),
        reused_tokens=stats.prefix_reused_tokens,
        read_tokens=stats.prefix_read_tokens,
        held_bytes=held,
    )


def measure(
    calls_levels: Sequence[int],
    turns: int,
    think_s: float,
    max_new: int,
    backends: Sequence[str] = ("llama_cpp",),
) -> list[TurnSeries]:
    """Every backend and level of concurrent calls, reuse at its default budget and at 0."""
    found = []
    for name in backends:
        default_mb = default_budget_mb(name)
        for calls in calls_levels:
            for variant, budget in (
                (f"{name}, prefix reuse", default_mb),
                (f"{name}, no reuse", 0.0),
            ):
                found.append(trio.run(run, calls, turns, think_s, max_new, budget, variant, name))
    return found


def report(series: Sequence[TurnSeries]) -> None:
    header, rows = turn_table(series)
    print(render_text_table(rows, header))
    print()
    print(render_text_table(turn_summary_rows(series), TURN_SUMMARY_COLUMNS))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", default="1,8")
    parser.add_argument("--turns", type=int, default=12)
    parser.add_argument("--think-s", type=float, default=1.0)
    parser.add_argument("--max-new", type=int, default=40)
    parser.add_argument("--backends", default="llama_cpp", help=f"of {', '.join(BACKENDS)}")
    args = parser.parse_args()
    levels = [int(n) for n in args.calls.split(",")]
    backends = [name.strip() for name in args.backends.split(",")]
    report(measure(levels, args.turns, args.think_s, args.max_new, backends))


if __name__ == "__main__":
    main()
