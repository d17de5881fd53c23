"""The real server's OpenAI API: one stream through `/v1/chat/completions` (SSE),
measured against gRPC on the same server in the same minutes.

One client alternates: the same prompt through `/v1/chat/completions` (streamed, usage
asked for) and through LlamaService/GenerateStream, greedy, the same lengths as the
gRPC scenario, who goes first swapping every pair. On a machine whose load drifts
(shared CI runners, a busy laptop) only such pairs resolve a few per cent. Each
protocol's requests become a row (``http-sse``, ``grpc-paired``); as the two take
turns, their rows give the rate per stream (first token to last) and the time to first
token, not an aggregate.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Awaitable, Callable

from bench.config import BenchConfig
from bench.http_stream import PeerError, healthy, stream_events
from bench.loops import MAX_CONSECUTIVE_ERRORS
from bench.models import server_model_available
from bench.processes import ServerProcess, free_port, wait_until
from bench.records import GRPC_PAIRED, OPENAI_HTTP, LevelRun, RequestRecord
from bench.scenarios import Collect, ScenarioContext, ScenarioSkipped
from bench.scenarios.grpc_server import (
    START_TIMEOUT_S,
    TENANT,
    generate_method,
    one_request,
    server_environment,
    server_settings,
)

PATH = "/v1/chat/completions"
HEADERS = dict(TENANT)
NOTE = "alternating request by request with the other protocol on the same server"

Send = Callable[[int, int], Awaitable[RequestRecord]]  # (sequence, max new tokens)


def run(config: BenchConfig, context: ScenarioContext, collect: Collect) -> None:
    if not server_model_available():
        raise ScenarioSkipped(
            "the ENV=test model is not in the cache: run `ENV=test llm-local convert` first"
        )
    http_port, grpc_port = free_port(), free_port()
    environment = server_environment(config, grpc_port)
    environment["LLM_LOCAL_SERVICE_SERVER__HTTP_PORT"] = str(http_port)
    context.details[OPENAI_HTTP] = {"path": PATH, **server_settings(environment)}
    command = [sys.executable, "-m", "llm_local", "serve"]
    with ServerProcess(command, environment, context.run_dir / "http-server.log") as server:
        wait_until(lambda: healthy(http_port), server, START_TIMEOUT_S, "llm-local serve")
        context.log(f"  llm-local serve is ready on HTTP port {http_port} (pid {server.pid})")
        asyncio.run(_measure(config, http_port, grpc_port, collect))
        server.check_alive()
        context.details[OPENAI_HTTP]["exit_status"] = server.stop()


async def _measure(config: BenchConfig, http_port: int, grpc_port: int, collect: Collect) -> None:
    import grpc

    from llm_local.proto.sentiric.llm.v1 import llama_pb2

    async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        generate = generate_method(channel)

        async def via_grpc(sequence: int, max_new_tokens: int) -> RequestRecord:
            request = llama_pb2.GenerateStreamRequest(
                user_prompt=config.prompts[config.prompt_for(0, sequence)],
                params=llama_pb2.GenerationParams(max_new_tokens=max_new_tokens, temperature=0.0),
            )
            return await one_request(generate, request, 0)

        async def via_http(sequence: int, max_new_tokens: int) -> RequestRecord:
            body: dict[str, object] = {
                "messages": [
                    {"role": "user", "content": config.prompts[config.prompt_for(0, sequence)]}
                ],
                "max_tokens": max_new_tokens,
                "temperature": 0,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            return await _one_request(http_port, body)

        for send in (via_http, via_grpc):  # warm-up
            warm = await send(0, 4)
            if not warm.ok:
                raise RuntimeError(f"the warm-up request failed: {warm.error}")
        records = await _alternate(config, {OPENAI_HTTP: via_http, GRPC_PAIRED: via_grpc})
    for scenario, kept in records.items():
        # No aggregate (the window is empty): the two protocols took turns.
        start = kept[0].start
        collect(LevelRun(scenario, 1, tuple(kept), (start, start), notes=(NOTE,)))


async def _alternate(config: BenchConfig, sends: dict[str, Send]) -> dict[str, list[RequestRecord]]:
    """Pairs of requests, one per protocol, for twice the level duration (each protocol
    then gets about one level's worth)."""
    records: dict[str, list[RequestRecord]] = {name: [] for name in sends}
    order = list(sends)
    deadline = time.perf_counter() + 2 * config.duration_s
    sequence = failures = 0
    while sequence == 0 or time.perf_counter() < deadline:
        for name in order if sequence % 2 == 0 else reversed(order):
            record = await sends[name](sequence, config.max_new_tokens)
            records[name].append(record)
            failures = 0 if record.ok else failures + 1
        if failures >= MAX_CONSECUTIVE_ERRORS:
            break
        sequence += 1
    return records


async def _one_request(port: int, body: dict[str, object]) -> RequestRecord:
    arrivals: list[float] = []
    tokens: int | None = None
    reason: str | None = None
    error: str | None = None
    start = time.perf_counter()
    try:
        async for arrived, event in stream_events(port, PATH, body, HEADERS):
            if event.value == "[DONE]":
                continue
            chunk = json.loads(event.value)
            if "error" in chunk:
                raise PeerError(str(chunk["error"].get("message")))
            for choice in chunk.get("choices") or ():
                if choice.get("delta", {}).get("content"):
                    arrivals.append(arrived)
                if choice.get("finish_reason"):
                    reason = choice["finish_reason"]
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    except (OSError, PeerError, ValueError, KeyError, asyncio.IncompleteReadError) as exc:
        error = f"{type(exc).__name__}: {exc}"
    end = time.perf_counter()
    if error is None and tokens is None:
        error = "the stream ended without a usage chunk"
    return RequestRecord.streamed(
        0, start, end, arrivals, tokens=tokens, finish_reason=reason, error=error
    )
