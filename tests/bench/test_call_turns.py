"""bench/scenarios/call_turns.py: the calls driven against llama.cpp's server, here a fake
peer speaking its `/completion` stream (the real one is not built in the test suite)."""

from __future__ import annotations

import asyncio
import json
import math

from bench.config import BenchConfig
from bench.scenarios.call_turns import _peer_calls
from llm_local.core.types import GenerationRequest, Role


async def _fake_peer(bodies: list[dict[str, object]]) -> asyncio.Server:
    """Answers every POST with two content chunks and a final stop chunk, as SSE."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode()
        length = int(head.lower().split("content-length: ")[1].split("\r\n")[0])
        bodies.append(json.loads(await reader.readexactly(length)))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n")
        for chunk in ({"content": "Hi"}, {"content": " there"}, {"content": "", "stop": True}):
            writer.write(f"data: {json.dumps(chunk)}\n\n".encode())
            await writer.drain()
        writer.close()

    return await asyncio.start_server(answer, "127.0.0.1", 0)


def test_every_turn_is_timed_and_each_answer_is_fed_back_with_the_prompt_cache_on() -> None:
    config = BenchConfig(call_turns=3, call_think_s=0.0, call_max_new_tokens=5)
    bodies: list[dict[str, object]] = []
    seen: list[GenerationRequest] = []

    def encode(request: GenerationRequest) -> list[int]:
        seen.append(request)
        return [len(request.history)]

    async def main() -> list[list[float]]:
        server = await _fake_peer(bodies)
        port = server.sockets[0].getsockname()[1]
        async with server:
            return await _peer_calls(config, port, encode, 2)

    ttft = asyncio.run(asyncio.wait_for(main(), timeout=60))
    assert len(ttft) == 3 and all(len(turn) == 2 for turn in ttft)
    assert all(math.isfinite(value) and value >= 0 for turn in ttft for value in turn)
    assert len(bodies) == 6
    assert all(body["cache_prompt"] is True and body["n_predict"] == 5 for body in bodies)
    last = [request for request in seen if len(request.history) == 4]
    assert len(last) == 2  # each call's third turn carries two turns of history
    assert [turn.role for turn in last[0].history] == [Role.USER, Role.ASSISTANT] * 2
    assert last[0].history[1].content == "Hi there"
    assert len({request.system_prompt for request in seen}) == 2  # a persona per call
