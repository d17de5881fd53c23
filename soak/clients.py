"""The soak's clients: one coroutine per behaviour, each returning an `Outcome`.

Well-behaved streams on both gRPC services and the OpenAI API, and the abuse a shared
gateway produces: cancelling at a random token, a deadline that passes mid-stream,
closing the connection without a cancel, malformed requests, and reading nothing at all.
gRPC calls use the official grpcio client (asyncio flavour): one channel shared by the
well-behaved calls, as a gateway holds; a client that disconnects opens its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from bench.config import PROMPTS
from bench.http_stream import PeerError, stream_events
from soak.rawsocket import grpc_call_then_drop, stalled_grpc_call, stalled_sse_request

LLAMA_METHOD = "/sentiric.llm.v1.LlamaService/GenerateStream"
LOCAL_METHOD = "/sentiric.llm.v1.LLMLocalService/LocalGenerateStream"
CHAT_PATH = "/v1/chat/completions"
# Long enough for any admitted call: the queue wait (capacity.queue_timeout_s) included.
CALL_TIMEOUT_S = 300.0
SHORT_PROMPTS = (
    "What is the capital of France? Answer in one sentence.",
    "Name three colours.",
    "Say hello in Spanish.",
    "What is two plus two?",
)
FLOOD_TENANT = "tenant-a"
FLOOD_STREAMS = 24
HTTP_STATUS_CODES = {
    200: "OK",
    400: "INVALID_ARGUMENT",
    404: "NOT_FOUND",
    408: "CANCELLED",
    413: "INVALID_ARGUMENT",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}


@dataclass
class Outcome:
    """What one client saw."""

    kind: str
    tenant: str | None
    started: float  # time.monotonic()
    ended: float = 0.0
    status: str = "OK"  # a gRPC status name; HTTP statuses are mapped (HTTP_STATUS_CODES)
    detail: str = ""
    text: str = ""  # the text received, when the client read it all
    completion_tokens: int | None = None  # as the server reported it
    finish_reason: str | None = None
    expected_error: bool = False  # a malformed request: INVALID_ARGUMENT is the right answer
    checkable: bool = False  # read to the end: its text can be checked against the count
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def latency_s(self) -> float:
        return self.ended - self.started


@dataclass(frozen=True)
class Target:
    host: str
    grpc_port: int
    http_port: int
    stall_hold_s: float  # how long a client that stops reading keeps its connection


class Clients:
    """Makes requests of each kind against one server."""

    def __init__(self, target: Target, channel: Any, rng: random.Random) -> None:
        from llm_local.proto.sentiric.llm.v1 import llama_pb2, local_pb2

        self.target = target
        self._target = target
        self._channel = channel
        self._rng = rng
        self._llama_pb2 = llama_pb2
        self._local_pb2 = local_pb2
        self.behaviours: dict[
            str, Callable[[str | None, int], Awaitable[Outcome | list[Outcome]]]
        ] = {
            "grpc-llama": self.llama_stream,
            "grpc-local": self.local_stream,
            "openai-stream": self.openai_stream,
            "openai-whole": self.openai_whole,
            "cancel-at-token": self.cancel_at_token,
            "deadline-midway": self.deadline_midway,
            "disconnect-grpc": self.disconnect_grpc,
            "disconnect-http": self.disconnect_http,
            "bad-request": self.bad_request,
            "stop-reading": self.stop_reading,
            "flood": self.flood,
        }

    # -- helpers ---------------------------------------------------------------------------

    def _prompt(self) -> str:
        return self._rng.choice(PROMPTS + SHORT_PROMPTS)

    def _llama_request(self, max_new_tokens: int, **params: Any) -> Any:
        pb = self._llama_pb2
        return pb.GenerateStreamRequest(
            user_prompt=self._prompt(),
            params=pb.GenerationParams(max_new_tokens=max_new_tokens, **params),
        )

    def _llama_call(self, channel: Any) -> Any:
        pb = self._llama_pb2
        return channel.unary_stream(
            LLAMA_METHOD,
            request_serializer=pb.GenerateStreamRequest.SerializeToString,
            response_deserializer=pb.GenerateStreamResponse.FromString,
        )

    def _local_call(self) -> Any:
        pb = self._local_pb2
        return self._channel.unary_stream(
            LOCAL_METHOD,
            request_serializer=pb.LocalGenerateStreamRequest.SerializeToString,
            response_deserializer=pb.LocalGenerateStreamResponse.FromString,
        )

    @staticmethod
    def _metadata(tenant: str | None) -> tuple[tuple[str, str], ...]:
        return () if tenant is None else (("x-tenant-id", tenant),)

    @staticmethod
    def _headers(tenant: str | None) -> dict[str, str]:
        return {} if tenant is None else {"x-tenant-id": tenant}

    def _chat_body(self, max_tokens: int, stream: bool) -> dict[str, object]:
        body: dict[str, object] = {
            "messages": [{"role": "user", "content": self._prompt()}],
            "max_tokens": max_tokens,
            "stream": stream,
        }
        if stream:
            body["stream_options"] = {"include_usage": True}
        return body

    # -- well-behaved ----------------------------------------------------------------------

    async def llama_stream(self, tenant: str | None, max_new_tokens: int) -> Outcome:
        outcome = Outcome("grpc-llama", tenant, time.monotonic())
        request = self._llama_request(max_new_tokens)
        await self._read_llama(outcome, self._llama_call(self._channel), request, tenant, None)
        return outcome

    async def _read_llama(
        self,
        outcome: Outcome,
        method: Any,
        request: Any,
        tenant: str | None,
        stop_after: int | None,
        deadline_s: float = CALL_TIMEOUT_S,
    ) -> None:
        """Read a LlamaService stream; `stop_after` messages: cancel the call there."""
        import grpc

        received = bytearray()
        messages = 0
        call = method(request, metadata=self._metadata(tenant), timeout=deadline_s)
        try:
            async for response in call:
                if response.WhichOneof("type") == "token":
                    received += response.token
                    messages += 1
                    if stop_after is not None and messages >= stop_after:
                        call.cancel()
                        outcome.status = "CANCELLED"
                        outcome.detail = f"cancelled by the client after {messages} messages"
                        break
                else:
                    details = response.finish_details
                    outcome.completion_tokens = details.completion_tokens
                    outcome.finish_reason = details.finish_reason
        except grpc.aio.AioRpcError as error:
            outcome.status, outcome.detail = error.code().name, error.details() or ""
        except asyncio.CancelledError:
            if outcome.status != "CANCELLED":
                raise
        outcome.ended = time.monotonic()
        try:
            outcome.text = received.decode("utf-8")
        except UnicodeDecodeError:
            # The contract: the token bytes of a stream concatenate to valid UTF-8.
            outcome.text = received.decode("utf-8", errors="replace")
            outcome.extra["invalid_utf8"] = True
        if outcome.status == "OK":
            if outcome.finish_reason is None:
                outcome.status, outcome.detail = "NO_FINISH", "stream ended without finish_details"
            else:
                outcome.checkable = True

    async def local_stream(self, tenant: str | None, max_new_tokens: int) -> Outcome:
        import grpc

        outcome = Outcome("grpc-local", tenant, time.monotonic())
        request = self._local_pb2.LocalGenerateStreamRequest(prompt=self._prompt())
        parts: list[str] = []
        call = self._local_call()(request, metadata=self._metadata(tenant), timeout=CALL_TIMEOUT_S)
        try:
            async for response in call:
                parts.append(response.token)
        except grpc.aio.AioRpcError as error:
            outcome.status, outcome.detail = error.code().name, error.details() or ""
        outcome.ended = time.monotonic()
        outcome.text = "".join(parts)
        return outcome

    async def openai_stream(self, tenant: str | None, max_new_tokens: int) -> Outcome:
        outcome = Outcome("openai-stream", tenant, time.monotonic())
        await self._read_sse(outcome, self._chat_body(max_new_tokens, True), tenant, None)
        return outcome

    async def _read_sse(
        self,
        outcome: Outcome,
        body: dict[str, object],
        tenant: str | None,
        stop_after: int | None,
    ) -> None:
        parts: list[str] = []
        events = 0
        events_of = stream_events(self._target.http_port, CHAT_PATH, body, self._headers(tenant))
        try:
            # aclosing: leaving the loop closes the socket now, not when collected.
            async with contextlib.aclosing(events_of) as arriving:  # type: ignore[type-var]
                async for _, event in arriving:
                    if event.value == "[DONE]":
                        break
                    chunk = json.loads(event.value)
                    if "error" in chunk:
                        outcome.status = "STREAM_ERROR"
                        outcome.detail = str(chunk["error"].get("message"))
                        break
                    for choice in chunk.get("choices") or ():
                        parts.append(choice.get("delta", {}).get("content") or "")
                        if choice.get("finish_reason"):
                            outcome.finish_reason = choice["finish_reason"]
                    if chunk.get("usage"):
                        outcome.completion_tokens = chunk["usage"]["completion_tokens"]
                    events += 1
                    if stop_after is not None and events >= stop_after:
                        # Leaving the generator closes the socket: no cancel, just gone.
                        outcome.status = "DISCONNECTED"
                        outcome.detail = f"closed the connection after {events} events"
                        break
        except PeerError as error:
            outcome.status, outcome.detail = _http_status(str(error)), str(error)[:200]
        except (OSError, asyncio.IncompleteReadError) as error:
            outcome.status, outcome.detail = "CONNECTION_ERROR", repr(error)
        outcome.ended = time.monotonic()
        outcome.text = "".join(parts)
        if outcome.status == "OK":
            if outcome.completion_tokens is None:
                outcome.status, outcome.detail = "NO_FINISH", "stream ended without usage"
            else:
                outcome.checkable = True

    async def openai_whole(self, tenant: str | None, max_new_tokens: int) -> Outcome:
        outcome = Outcome("openai-whole", tenant, time.monotonic())
        status, answer = await post_json(
            self._target.host,
            self._target.http_port,
            CHAT_PATH,
            json.dumps(self._chat_body(max_new_tokens, False)).encode(),
            self._headers(tenant),
        )
        outcome.ended = time.monotonic()
        outcome.status = HTTP_STATUS_CODES.get(status, f"HTTP {status}")
        if status == 200:
            parsed = json.loads(answer)
            outcome.text = parsed["choices"][0]["message"]["content"] or ""
            outcome.finish_reason = parsed["choices"][0]["finish_reason"]
            outcome.completion_tokens = parsed["usage"]["completion_tokens"]
            outcome.checkable = True
        else:
            outcome.detail = answer[:300].decode(errors="replace")
        return outcome

    # -- abusive ---------------------------------------------------------------------------

    async def cancel_at_token(self, tenant: str | None, max_new_tokens: int) -> Outcome:
        outcome = Outcome("cancel-at-token", tenant, time.monotonic())
        request = self._llama_request(max_new_tokens)
        stop_after = self._rng.randint(1, max(1, max_new_tokens // 2))
        method = self._llama_call(self._channel)
        await self._read_llama(outcome, method, request, tenant, stop_after)
        return outcome

    async def deadline_midway(self, tenant: str | None, max_new_tokens: int) -> Outcome:
        outcome = Outcome("deadline-midway", tenant, time.monotonic())
        request = self._llama_request(max_new_tokens)
        timeout = self._rng.uniform(0.3, 3.0)
        outcome.extra["deadline_s"] = round(timeout, 3)
        method = self._llama_call(self._channel)
        await self._read_llama(outcome, method, request, tenant, None, deadline_s=timeout)
        return outcome

    async def disconnect_grpc(self, tenant: str | None, max_new_tokens: int) -> Outcome:
        """Its own connection, closed after a few messages without cancelling the call."""
        outcome = Outcome("disconnect-grpc", tenant, time.monotonic())
        message = self._llama_request(max_new_tokens).SerializeToString()
        wanted = self._rng.randint(1, max(1, max_new_tokens // 2))
        target = self._target
        try:
            read = await asyncio.to_thread(
                grpc_call_then_drop,
                target.grpc_port,
                LLAMA_METHOD,
                message,
                dict(self._metadata(tenant)),
                wanted,
                target.host,
            )
        except OSError as error:
            outcome.status, outcome.detail = "CONNECTION_ERROR", repr(error)
        else:
            outcome.status = "DISCONNECTED"
            outcome.detail = f"closed the connection after {read} messages"
        outcome.ended = time.monotonic()
        return outcome

    async def disconnect_http(self, tenant: str | None, max_new_tokens: int) -> Outcome:
        outcome = Outcome("disconnect-http", tenant, time.monotonic())
        stop_after = self._rng.randint(1, max(1, max_new_tokens // 2))
        await self._read_sse(outcome, self._chat_body(max_new_tokens, True), tenant, stop_after)
        outcome.checkable = False
        return outcome

    async def bad_request(self, tenant: str | None, max_new_tokens: int) -> Outcome:
        """One of several malformed requests; INVALID_ARGUMENT (400) is the right answer."""
        import grpc

        outcome = Outcome("bad-request", tenant, time.monotonic(), expected_error=True)
        variant = self._rng.randrange(5)
        outcome.extra["variant"] = variant
        if variant < 3:
            if variant == 0:
                request = self._llama_request(max_new_tokens, top_p=2.0)
            elif variant == 1:
                request = self._llama_pb2.GenerateStreamRequest(user_prompt="")
            else:
                request = self._llama_request(max_new_tokens)
                tenant = None  # production requires x-tenant-id
            call = self._llama_call(self._channel)(
                request, metadata=self._metadata(tenant), timeout=CALL_TIMEOUT_S
            )
            try:
                async for _ in call:
                    pass
            except grpc.aio.AioRpcError as error:
                outcome.status, outcome.detail = error.code().name, error.details() or ""
        else:
            body = b"{not json" if variant == 3 else json.dumps({"messages": "hello"}).encode()
            status, answer = await post_json(
                self._target.host, self._target.http_port, CHAT_PATH, body, self._headers(tenant)
            )
            outcome.status = HTTP_STATUS_CODES.get(status, f"HTTP {status}")
            outcome.detail = answer[:200].decode(errors="replace")
        outcome.ended = time.monotonic()
        return outcome

    async def flood(self, tenant: str | None, max_new_tokens: int) -> list[Outcome]:
        """The heaviest tenant opens many streams at once (beyond its limit, with luck)."""
        outcomes = await asyncio.gather(
            *(self.llama_stream(FLOOD_TENANT, max_new_tokens) for _ in range(FLOOD_STREAMS))
        )
        for outcome in outcomes:
            outcome.kind = "flood"
        return list(outcomes)

    async def stop_reading(self, tenant: str | None, max_new_tokens: int) -> Outcome:
        """Send a request and read nothing, for `stall_hold_s`; then close the socket.

        gRPC: an HTTP/2 stream window of 0. HTTP: a tiny socket buffer never read; a long
        answer (the limit allows it) so that the buffers really fill."""
        outcome = Outcome("stop-reading", tenant, time.monotonic())
        target = self._target
        metadata = dict(self._metadata(tenant))
        if self._rng.random() < 0.5:
            outcome.extra["transport"] = "grpc"
            message = self._llama_request(max(max_new_tokens, 256)).SerializeToString()
            opened = await asyncio.to_thread(
                stalled_grpc_call, target.grpc_port, LLAMA_METHOD, message, metadata, target.host
            )
        else:
            outcome.extra["transport"] = "http"
            body = self._chat_body(1024, True)
            opened = await asyncio.to_thread(
                stalled_sse_request, target.http_port, CHAT_PATH, body, metadata, target.host
            )
        try:
            await asyncio.sleep(target.stall_hold_s)
        finally:
            opened.close()
        outcome.status = "STOPPED_READING"
        outcome.ended = time.monotonic()
        return outcome


async def post_json(
    host: str, port: int, path: str, payload: bytes, headers: dict[str, str]
) -> tuple[int, bytes]:
    """POST `payload` over HTTP/1.1 (Connection: close); (status, body)."""
    from bench.sse import ChunkedDecoder, parse_response_head

    reader, writer = await asyncio.open_connection(host, port)
    try:
        extra = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"{extra}Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n"
        )
        writer.write(head.encode() + payload)
        await writer.drain()
        status, response_headers = parse_response_head(await reader.readuntil(b"\r\n\r\n"))
        # By length: hypercorn answers "Connection: close" but may keep the socket open.
        length = response_headers.get("content-length")
        if length is not None:
            return status, await reader.readexactly(int(length))
        if "chunked" in response_headers.get("transfer-encoding", "").lower():
            decoder, body = ChunkedDecoder(), bytearray()
            while not decoder.done:
                data = await reader.read(65536)
                if not data:
                    break
                body += decoder.feed(data)
            return status, bytes(body)
        return status, await reader.read()
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


def _http_status(message: str) -> str:
    """The status name of bench's PeerError message "HTTP 429: ..."."""
    try:
        code = int(message.split()[1].rstrip(":"))
    except (IndexError, ValueError):
        return "HTTP_ERROR"
    return HTTP_STATUS_CODES.get(code, f"HTTP {code}")
