"""The maximum connection age: the policy (connection_age.py), then a real socket with
grpcio as the client (an implementation of gRPC other than the server's) and the fake
backend. Tests assert what happened, never how long it took: each waits for the
server's own account (its log) of the GOAWAY before it looks."""

from __future__ import annotations

import logging
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest
import trio

from llm_local.proto.sentiric.llm.v1 import llama_pb2
from llm_local.transport.grpc.connection_age import ConnectionAge, refuses_stream

StartServer = Callable[..., Awaitable[Any]]  # the start_server fixture (conftest.py)

# 256 tokens x 10 ms: still running long after a connection age of 0.2 s.
SLOW = {"token_delay_s": 0.01, "reply": "x" * 2000}
AGED = "gRPC connection reached its maximum age"
BRIDGE_LOG = "llm_local.transport.grpc.bridge"


def test_the_age_is_spread_by_ten_percent_either_way() -> None:
    age = ConnectionAge(max_age_s=100.0, grace_s=5.0)

    assert age.age_s(lambda: 0.0) == pytest.approx(90.0)
    assert age.age_s(lambda: 0.5) == pytest.approx(100.0)
    assert age.age_s(lambda: 0.999999) == pytest.approx(110.0, abs=1e-3)
    assert ConnectionAge(100.0, 5.0, jitter=0.0).age_s(lambda: 0.7) == 100.0


@pytest.mark.parametrize(
    "arguments", [(0.0, 1.0), (-1.0, 1.0), (1.0, -0.5), (1.0, 1.0, 1.0), (1.0, 1.0, -0.1)]
)
def test_a_connection_age_out_of_range_is_refused(arguments: tuple[float, ...]) -> None:
    with pytest.raises(ValueError, match="invalid connection age"):
        ConnectionAge(*arguments)


def test_after_goaway_only_streams_beyond_the_last_one_named_are_refused() -> None:
    assert not refuses_stream(7, None)  # no GOAWAY yet
    assert not refuses_stream(7, 7)
    assert refuses_stream(9, 7)


def request(max_new_tokens: int | None = None) -> llama_pb2.GenerateStreamRequest:
    message = llama_pb2.GenerateStreamRequest(user_prompt="Hi")
    if max_new_tokens is not None:
        message.params.max_new_tokens = max_new_tokens
    return message


async def aged(caplog: pytest.LogCaptureFixture, count: int = 1) -> list[logging.LogRecord]:
    """Wait (at most 10 s) until `count` connections have told of their GOAWAY."""
    with trio.fail_after(10):
        while True:
            records = [r for r in caplog.records if r.getMessage().startswith(AGED)]
            if len(records) >= count:
                return records
            await trio.sleep(0.02)


def peers(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The client address of each call the flow received, in order."""
    return [
        str(record.peer)  # type: ignore[attr-defined]
        for record in caplog.records
        if record.getMessage() == "request received"
    ]


async def test_a_stream_running_at_the_age_finishes_and_later_calls_use_a_new_connection(
    start_server: StartServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger=BRIDGE_LOG)
    caplog.set_level(logging.DEBUG, logger="llm_local.request")
    server = await start_server(
        SLOW, server__grpc_max_connection_age_s=0.2, server__grpc_max_connection_age_grace_s=30
    )
    stream = server.llama(request(), timeout=30)
    first = await server.call(next, stream)
    assert first.token

    (goaway,) = await aged(caplog)
    rest = await server.call(list, stream)
    after = await server.call(lambda: list(server.llama(request(max_new_tokens=2))))

    assert goaway.running == 1  # type: ignore[attr-defined]  # the stream was running
    assert stream.code() == grpc.StatusCode.OK
    assert rest[-1].finish_details.finish_reason == "length"
    assert rest[-1].finish_details.completion_tokens == 256
    assert after[-1].finish_details.completion_tokens == 2
    # The next call came over another connection: the client reconnected.
    first_peer, next_peer = peers(caplog)
    assert first_peer != next_peer
    metrics = server.service.metrics
    assert metrics.requests.labels(service="LlamaService", code="OK")._value.get() == 2


async def test_a_stream_still_running_when_the_grace_ends_is_cut(
    start_server: StartServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger=BRIDGE_LOG)
    server = await start_server(
        SLOW, server__grpc_max_connection_age_s=0.2, server__grpc_max_connection_age_grace_s=0.2
    )
    stream = server.llama(request(), timeout=30)
    assert (await server.call(next, stream)).token

    error = await server.call(server.error, lambda: list(stream))
    await server.wait_until_idle()

    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert any("end of its grace period" in r.getMessage() for r in caplog.records)
    metrics = server.service.metrics
    assert metrics.requests.labels(service="LlamaService", code="CANCELLED")._value.get() == 1
    assert server.backend.stats().running == 0


async def test_without_an_age_a_connection_is_never_told_to_go(
    start_server: StartServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger=BRIDGE_LOG)
    caplog.set_level(logging.DEBUG, logger="llm_local.request")
    server = await start_server()  # the default: server.grpc_max_connection_age_s = 0

    for _ in range(3):
        await server.call(lambda: list(server.llama(request(max_new_tokens=2))))

    assert not [r for r in caplog.records if r.getMessage().startswith(AGED)]
    assert len(set(peers(caplog))) == 1


Frame = tuple[int, int, int, bytes]  # type, flags, stream id, payload
HEADERS_FRAME, RST_STREAM_FRAME, GOAWAY_FRAME = 0x1, 0x3, 0x7
END_STREAM = 0x1
REFUSED_STREAM = 0x7


class FrameReader:
    """Raw HTTP/2 frames from a socket; bytes of a frame not yet whole wait for the next
    read."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._pending = b""

    def until(self, condition: Callable[[list[Frame]], bool]) -> list[Frame]:
        """Frames read until `condition` holds of them."""
        frames: list[Frame] = []
        while not condition(frames):
            pending = self._pending
            if len(pending) < 9 or len(pending) < 9 + int.from_bytes(pending[:3], "big"):
                data = self._sock.recv(65536)
                assert data, "the server closed the connection"
                self._pending += data
                continue
            length = int.from_bytes(pending[:3], "big")
            stream_id = int.from_bytes(pending[5:9], "big") & 0x7FFFFFFF
            frames.append((pending[3], pending[4], stream_id, pending[9 : 9 + length]))
            self._pending = pending[9 + length :]
        return frames


def late_stream_after_goaway(port: int) -> tuple[int, list[Frame]]:
    """Open a slow call on stream 1, wait for the GOAWAY, then open stream 3 anyway (as
    a client does that sent it before reading the GOAWAY). Returns the last stream id
    the GOAWAY named and the frames that followed it, up to stream 1's trailers and
    stream 3's reset."""
    import h2.config
    import h2.connection
    from hyperframe.frame import HeadersFrame

    message = request().SerializeToString()
    headers = [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", "/sentiric.llm.v1.LlamaService/GenerateStream"),
        (":authority", f"127.0.0.1:{port}"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ]
    with socket.create_connection(("127.0.0.1", port)) as sock:
        client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        client.initiate_connection()
        client.send_headers(1, headers)
        client.send_data(1, b"\x00" + len(message).to_bytes(4, "big") + message, end_stream=True)
        sock.sendall(client.data_to_send())
        reader = FrameReader(sock)
        seen = reader.until(lambda frames: any(f[0] == GOAWAY_FRAME for f in frames))
        goaway = next(f[3] for f in seen if f[0] == GOAWAY_FRAME)
        # h2 would not open a stream once it read a GOAWAY: this one is written by hand,
        # with h2's own HPACK encoder (the state the server's decoder follows).
        late = HeadersFrame(3, client.encoder.encode(headers))
        late.flags.add("END_HEADERS")
        late.flags.add("END_STREAM")
        sock.sendall(late.serialize())

        def done(frames: list[Frame]) -> bool:
            reset = any(f[0] == RST_STREAM_FRAME and f[2] == 3 for f in frames)
            trailers = any(
                f[0] == HEADERS_FRAME and f[2] == 1 and f[1] & END_STREAM for f in frames
            )
            return reset and trailers

        return int.from_bytes(goaway[:4], "big") & 0x7FFFFFFF, reader.until(done)


async def test_a_stream_opened_after_the_goaway_is_refused_and_the_running_one_ends(
    start_server: StartServer,
) -> None:
    server = await start_server(
        SLOW, server__grpc_max_connection_age_s=0.2, server__grpc_max_connection_age_grace_s=30
    )

    last_stream_id, after = await trio.to_thread.run_sync(late_stream_after_goaway, server.port)

    assert last_stream_id == 1
    (reset,) = [f for f in after if f[0] == RST_STREAM_FRAME]
    assert (reset[2], int.from_bytes(reset[3], "big")) == (3, REFUSED_STREAM)
    assert any(f[0] == 0x0 and f[2] == 1 for f in after)  # stream 1's DATA went on
    await server.wait_until_idle()
    metrics = server.service.metrics
    assert metrics.requests.labels(service="LlamaService", code="OK")._value.get() == 1
