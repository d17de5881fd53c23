"""Phone calls turn by turn: time to first token against the turn number, prefix reuse on/off.

`python -m bench.call_turns [--calls 1,8] [--turns 12] [--think-s 1.0] [--max-new 40]`: the
in-process llama_cpp backend on the test GGUF; each call a persona of its tenant (about 220
tokens), scripted caller lines, the answers fed back into the history and the whole history
resent every turn (as the gateway does), a think time between turns. The same calls run with
`llama_cpp.prefix_cache_mb` at its default and at 0 (no reuse), one after the other on the
same machine; the table gives TTFT p50/p95 by turn, tokens reused and bytes held, and the
issue's goal: the last three turns' TTFT over the median of turns 1-3 (one call alone:
at most 1.5). Not yet part of `make bench`'s scenario list (no llama-server peer, no plot).
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import statistics
import time

import trio

from llm_local.backends.llama_cpp.backend import LlamaCppBackend
from llm_local.backends.llama_cpp.loader import plan_from_settings
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


@dataclasses.dataclass
class Result:
    ttft: dict[int, list[float]]
    reused: int
    read: int
    held_bytes: int


async def run(calls: int, turns: int, think_s: float, max_new: int, budget_mb: float) -> Result:
    loaded = load_settings(env="test")
    settings = dataclasses.replace(
        loaded, llama_cpp=dataclasses.replace(loaded.llama_cpp, prefix_cache_mb=budget_mb)
    )
    backend = LlamaCppBackend(lambda: plan_from_settings(settings))
    await backend.load()
    ttft: dict[int, list[float]] = {turn: [] for turn in range(turns)}
    held = 0
    try:

        async def one_call(index: int) -> None:
            nonlocal held
            name, shop = SHOPS[index % len(SHOPS)]
            persona = PERSONA.format(name=name, shop=shop)
            tenant = f"tenant-{index % len(SHOPS)}"
            history: list[ChatTurn] = []
            await trio.sleep(random.Random(index).uniform(0, think_s))
            for turn in range(turns):
                line = LINES[turn % len(LINES)]
                request = GenerationRequest(
                    user_prompt=line,
                    system_prompt=persona,
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
    return Result(ttft, stats.prefix_reused_tokens, stats.prefix_read_tokens, held)


def p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def report(label: str, result: Result) -> None:
    turns = len(result.ttft)
    p50 = [p(result.ttft[t], 0.5) for t in range(turns)]
    p95 = [p(result.ttft[t], 0.95) for t in range(turns)]
    first = statistics.median(p50[:3])
    last = max(p50[-3:])
    print(f"{label}: TTFT p50 by turn (ms): " + " ".join(f"{v:.0f}" for v in p50))
    print(f"{label}: TTFT p95 by turn (ms): " + " ".join(f"{v:.0f}" for v in p95))
    print(
        f"{label}: last 3 turns / median of turns 1-3 = {last / first:.2f}; p95 turns 9-12 / "
        f"p95 turns 1-3 = {max(p95[8:12] or [0]) / max(p95[:3]):.2f}; reused "
        f"{result.reused} tokens, read {result.read}; most bytes held {result.held_bytes:,}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", default="1,8")
    parser.add_argument("--turns", type=int, default=12)
    parser.add_argument("--think-s", type=float, default=1.0)
    parser.add_argument("--max-new", type=int, default=40)
    args = parser.parse_args()
    default_mb = load_settings(env="test").llama_cpp.prefix_cache_mb
    for calls in (int(n) for n in args.calls.split(",")):
        for label, budget in (("reuse", default_mb), ("no reuse", 0.0)):
            result = trio.run(run, calls, args.turns, args.think_s, args.max_new, budget)
            report(f"{calls} call(s), llama_cpp, {label}", result)


if __name__ == "__main__":
    main()
