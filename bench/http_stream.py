"""POST a JSON body and read the server-sent events of the answer as they arrive.

Plain asyncio streams and the decoders of sse.py (the benchmark has no HTTP client
library): used for llama.cpp's `/completion` and llm-local's `/v1/chat/completions`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Mapping

from bench.sse import ChunkedDecoder, ServerSentEvent, SSEParser, parse_response_head

READ_SIZE = 65536


def healthy(port: int) -> bool:
    """True once GET /health answers 200 (503 while a model loads; refused before the
    server listens)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as answer:
            return bool(answer.status == 200)
    except (urllib.error.URLError, OSError):
        return False


class PeerError(Exception):
    """The server answered with an error (HTTP status or an SSE `error` field)."""


async def stream_events(
    port: int,
    path: str,
    body: dict[str, object],
    headers: Mapping[str, str] | None = None,
) -> AsyncIterator[tuple[float, ServerSentEvent]]:
    """POST `body` to `path` and yield (arrival time, event) for each server-sent event."""
    payload = json.dumps(body).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        extra = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
        head = (
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            "Content-Type: application/json\r\nAccept: text/event-stream\r\n"
            f"{extra}Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n"
        )
        writer.write(head.encode() + payload)
        await writer.drain()
        status, response_headers = parse_response_head(await reader.readuntil(b"\r\n\r\n"))
        if status != 200:
            rest = await reader.read(READ_SIZE)
            raise PeerError(f"HTTP {status}: {rest[:300].decode(errors='replace')}")
        chunked = "chunked" in response_headers.get("transfer-encoding", "").lower()
        decoder = ChunkedDecoder() if chunked else None
        parser = SSEParser()
        while True:
            data = await reader.read(READ_SIZE)
            if not data:
                break
            arrived = time.perf_counter()
            for event in parser.feed(decoder.feed(data) if decoder is not None else data):
                yield arrived, event
            if decoder is not None and decoder.done:
                break
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
