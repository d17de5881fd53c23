"""The real server's OpenAI API: one stream through `/v1/chat/completions` (SSE).

Set beside the gRPC scenario (same settings, same prompts as the user turn, greedy,
same lengths), so that the report can put HTTP/SSE against gRPC in one run: tokens/s
as a ratio, time to first token as a difference. One stream only: what the API layer
costs a single client; concurrency is the gRPC scenario's subject. Token counts come
from the usage chunk (``stream_options.include_usage``).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import urllib.error
import urllib.request
from dataclasses import replace

from bench.config import BenchConfig
from bench.http_stream import PeerError, stream_events
from bench.loops import measure_server_levels
from bench.models import server_model_available
from bench.processes import ServerProcess, free_port, wait_until
from bench.records import OPENAI_HTTP, RequestRecord
from bench.scenarios import Collect, ScenarioContext, ScenarioSkipped
from bench.scenarios.grpc_server import START_TIMEOUT_S, server_environment, server_settings

PATH = "/v1/chat/completions"
HEADERS = {"x-tenant-id": "bench"}
STREAMS = (1,)


def run(config: BenchConfig, context: ScenarioContext, collect: Collect) -> None:
    if not server_model_available():
        raise ScenarioSkipped(
            "the ENV=test model is not in the cache: run `ENV=test llm-local convert` first"
        )
    context.details[OPENAI_HTTP] = {"path": PATH, **server_settings()}
    port = free_port()
    environment = server_environment(config, free_port())
    environment["LLM_LOCAL_SERVICE_SERVER__HTTP_PORT"] = str(port)
    command = [sys.executable, "-m", "llm_local", "serve"]
    with ServerProcess(command, environment, context.run_dir / "http-server.log") as server:
        wait_until(lambda: _ready(port), server, START_TIMEOUT_S, "llm-local serve")
        context.log(f"  llm-local serve is ready on HTTP port {port} (pid {server.pid})")
        asyncio.run(_measure(config, server, port, collect))
        context.details[OPENAI_HTTP]["exit_status"] = server.stop()


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as answer:
            return bool(answer.status == 200)
    except (urllib.error.URLError, OSError):
        return False  # 503 while the model loads, refused before it listens


async def _measure(config: BenchConfig, server: ServerProcess, port: int, collect: Collect) -> None:
    async def send(client: int, sequence: int, max_new_tokens: int) -> RequestRecord:
        body: dict[str, object] = {
            "messages": [
                {"role": "user", "content": config.prompts[config.prompt_for(client, sequence)]}
            ],
            "max_tokens": max_new_tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        return await _one_request(port, body, client)

    await measure_server_levels(
        replace(config, streams=STREAMS), OPENAI_HTTP, server, send, collect
    )


async def _one_request(port: int, body: dict[str, object], client: int) -> RequestRecord:
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
        client, start, end, arrivals, tokens=tokens, finish_reason=reason, error=error
    )
