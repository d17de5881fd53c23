"""The one place where trio meets asyncio (grpclib is asyncio-only).

Shape (see FINDINGS.md, "grpclib on trio"): `asyncio_loop()` opens a trio-asyncio loop
inside the program's own `trio.run`; `AsyncioGrpcServer` starts grpclib's server on it;
`trio_handler` turns a trio function into a grpclib handler, so every request body runs
as a trio task. When grpclib cancels the handler (client cancelled, connection lost,
grpc-timeout passed) the trio body sees `trio.Cancelled` within a scheduler tick.

Each crossing costs tens of microseconds, so callers send whole token groups per
crossing (`TrioStream.send_messages`), never one crossing per token.

Nothing else in the project imports trio_asyncio: if it has to be replaced (it does not
import on Python 3.14), only this module changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import grpclib.utils
import trio
import trio_asyncio
from google.protobuf.message import DecodeError
from grpclib.const import Status
from grpclib.exceptions import GRPCError, StreamTerminatedError
from grpclib.protocol import EventsProcessor, H2Protocol
from grpclib.server import Server, Stream
from h2.errors import ErrorCodes
from h2.events import RequestReceived
from h2.exceptions import StreamClosedError
from h2.settings import SettingCodes
from hyperframe.frame import GoAwayFrame

from llm_local.serving import ClientGone
from llm_local.transport.grpc.connection_age import ConnectionAge, refuses_stream

GrpclibHandler = Callable[[Stream[Any, Any]], Awaitable[None]]

log = logging.getLogger(__name__)

MESSAGE_LIMIT_SETTING = "limits.grpc_max_message_bytes"
METADATA_LIMIT_SETTING = "limits.grpc_max_metadata_bytes"

# On Python 3.12+ asyncio.current_task is C code that cannot see trio-asyncio's loop;
# trio-asyncio replaces asyncio.current_task with a version that can, but grpclib keeps
# the function it found when it was first imported, which may be before trio_asyncio was
# (then every request fails with "no running event loop"). Point grpclib at the patched one.
grpclib.utils._current_task = asyncio.current_task


@asynccontextmanager
async def asyncio_loop() -> AsyncIterator[None]:
    """Run an asyncio loop inside the current trio run for as long as the block lasts."""
    async with trio_asyncio.open_loop():
        yield


@dataclass(frozen=True, slots=True)
class CallLimits:
    """What one call may send; None = unbounded (grpclib's own behaviour)."""

    max_message_bytes: int | None = None  # each request message
    max_metadata_bytes: int | None = None  # the call's metadata, counted as HTTP/2 does


NO_LIMITS = CallLimits()


class MessageTooLarge(Exception):
    """A request message's length prefix announced more than the limit."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(size, limit)
        self.size = size
        self.limit = limit


def metadata_bytes(metadata: Any) -> int:
    """The size of a call's metadata as HTTP/2 counts a header list (RFC 9113 6.5.2:
    name + value + 32 per field)."""
    if metadata is None:
        return 0
    total = 0
    for name, value in metadata.items():
        total += len(name) + len(value) + 32
    return total


class TrioStream:
    """A grpclib server stream as seen from trio code.

    `max_message_bytes` bounds each request message: grpclib itself reads a message's
    32-bit length prefix and then buffers that many bytes, whatever they are (up to
    4 GiB). Here a longer announcement ends the call before a byte of the body is read.
    """

    def __init__(self, stream: Stream[Any, Any], max_message_bytes: int | None = None) -> None:
        self._stream = stream
        self._max_message_bytes = max_message_bytes

    def metadata_value(self, key: str) -> str | None:
        """The first value of a request metadata key (lower-case), or None."""
        metadata = self._stream.metadata
        if metadata is None:
            return None
        value = metadata.get(key)
        if value is None:
            return None
        return value if isinstance(value, str) else bytes(value).decode("utf-8", "replace")

    def time_remaining(self) -> float | None:
        """Seconds until the client's deadline (grpc-timeout), or None without one."""
        deadline = self._stream.deadline
        if deadline is None:
            return None
        remaining: float = deadline.time_remaining()
        return remaining

    @property
    def peer_address(self) -> str | None:
        try:
            address = self._stream.peer.addr()
        except Exception:  # the connection may be gone already; only used for logs
            return None
        return None if address is None else f"{address[0]}:{address[1]}"

    async def recv_message(self) -> Any:
        """The next request message; MessageTooLarge when it is over the limit."""
        return await trio_asyncio.aio_as_trio(_recv_bounded)(self._stream, self._max_message_bytes)

    async def send_message(self, message: Any) -> None:
        await self.send_messages((message,))

    async def send_messages(self, messages: Sequence[Any]) -> None:
        """Send several messages with one crossing into asyncio."""
        try:
            await trio_asyncio.aio_as_trio(_send_all)(self._stream, messages)
        except StreamTerminatedError as exc:
            raise ClientGone(str(exc)) from exc


class UndecodableMessage(Exception):
    """The request message's bytes are not a valid message of its type (e.g. a string
    field that is not UTF-8); `wire` holds them, to say which field."""

    def __init__(self, wire: bytes, reason: str) -> None:
        super().__init__(reason)
        self.wire = wire
        self.reason = reason


async def _recv_bounded(stream: Stream[Any, Any], limit: int | None) -> Any:
    # grpclib reads a message as two reads of the HTTP/2 stream: the 5-byte prefix, then
    # the length it announced. Bounding every read of this stream refuses the body read
    # before it starts, and keeping the last read gives the bytes a failed decode was
    # about; grpclib has no public hook for either (its protocol stream is private).
    protocol_stream = stream._stream
    read = protocol_stream.recv_data
    last_read = b""

    async def bounded_read(size: int) -> bytes:
        nonlocal last_read
        if limit is not None and size > limit:
            raise MessageTooLarge(size, limit)
        data: bytes = await read(size)
        last_read = data
        return data

    protocol_stream.recv_data = bounded_read
    try:
        return await stream.recv_message()
    except DecodeError as exc:
        raise UndecodableMessage(last_read, str(exc)) from None
    finally:
        protocol_stream.recv_data = read


async def _send_all(stream: Stream[Any, Any], messages: Sequence[Any]) -> None:
    for message in messages:
        await stream.send_message(message)


TrioBody = Callable[[TrioStream], Awaitable[None]]
# Told the status of a call refused before its body ran (to count it).
RefusalHook = Callable[[Status], None]


class HandlerTracker:
    """Counts handlers still running, up to their final status being sent."""

    def __init__(self) -> None:
        self._active = 0
        self._idle = trio.Event()
        self._idle.set()

    @property
    def active(self) -> int:
        return self._active

    def _enter(self) -> None:
        if self._active == 0:
            self._idle = trio.Event()
        self._active += 1

    def _exit(self) -> None:
        self._active -= 1
        if self._active == 0:
            self._idle.set()

    async def wait_idle(self) -> None:
        await self._idle.wait()


def trio_handler(
    body: TrioBody,
    tracker: HandlerTracker | None = None,
    limits: CallLimits = NO_LIMITS,
    on_refusal: RefusalHook | None = None,
) -> GrpclibHandler:
    """A grpclib handler that runs `body` as a trio task.

    The call ends with OK when `body` returns, or with the status of the GRPCError it
    raises; other exceptions reach grpclib (UNKNOWN). Cancelling the handler (client
    gone, deadline) cancels `body`. The final status is sent here rather than by
    grpclib after the handler returns, so that `tracker` goes idle only once every
    tracked call has told its client how it ended. Metadata over `limits` ends the call
    with RESOURCE_EXHAUSTED before `body` runs (and `on_refusal` hears of it).
    """

    async def handler(stream: Stream[Any, Any]) -> None:
        if tracker is not None:
            tracker._enter()
        try:
            try:
                try:
                    _check_metadata(stream, limits.max_metadata_bytes)
                except GRPCError as refusal:
                    if on_refusal is not None:
                        on_refusal(refusal.status)
                    raise
                await trio_asyncio.trio_as_aio(body)(TrioStream(stream, limits.max_message_bytes))
            except GRPCError as error:
                status, message = error.status, error.message
            else:
                status, message = Status.OK, None
            with contextlib.suppress(StreamClosedError, StreamTerminatedError):
                await stream.send_trailing_metadata(status=status, status_message=message)
        finally:
            if tracker is not None:
                tracker._exit()

    return handler


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """HTTP/2 settings every connection advertises and enforces; None = h2's own.

    A header block over `max_header_list_size` closes the whole connection (HPACK
    cannot skip a block without decoding it, and h2 refuses to): the per-call metadata
    limit (`CallLimits`) is meant to be well below it, so that ordinary excess gets a
    status on its own call. `max_age`: how long a connection lives (connection_age.py);
    None = for ever.
    """

    max_concurrent_streams: int | None = None
    max_header_list_size: int | None = None
    max_age: ConnectionAge | None = None


class _ServerEvents(EventsProcessor):  # type: ignore[misc]
    """grpclib's event processing, plus what its server lacks: refusing streams opened
    after our GOAWAY, telling of calls to unknown methods, and telling the protocol when
    a stream's handler is done (to close an aged connection once it has none)."""

    def __init__(self, protocol: _LimitedProtocol) -> None:
        super().__init__(protocol.handler, protocol.connection)
        self._protocol = protocol

    def process_request_received(self, event: RequestReceived) -> None:
        protocol = self._protocol
        if refuses_stream(event.stream_id, protocol.last_stream_id):
            self.connection._connection.reset_stream(event.stream_id, ErrorCodes.REFUSED_STREAM)
            return
        if protocol.on_unknown_method is not None:
            # grpclib has h2 decode header names and values to str.
            headers: dict[Any, Any] = dict(event.headers or ())
            path = headers.get(":path")
            if path not in protocol.known_paths:
                protocol.on_unknown_method()  # grpclib answers UNIMPLEMENTED itself
        super().process_request_received(event)

    def register(self, stream: Any) -> Callable[[], None]:
        release = super().register(stream)

        def release_stream() -> None:
            release()
            self._protocol.stream_released()

        return release_stream


class _LimitedProtocol(H2Protocol):  # type: ignore[misc]
    limits = ConnectionLimits()
    known_paths: frozenset[str] = frozenset()
    on_unknown_method: Callable[[], None] | None = None
    # The last stream id our GOAWAY named; None until the connection reached its age.
    last_stream_id: int | None = None
    _age_timer: asyncio.TimerHandle | None = None
    _grace_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.processor = _ServerEvents(self)
        limits = self.limits
        if limits.max_age is not None:
            loop = asyncio.get_running_loop()
            self._age_timer = loop.call_later(limits.max_age.age_s(random.random), self._go_away)
        changes = {
            code: value
            for code, value in (
                (SettingCodes.MAX_CONCURRENT_STREAMS, limits.max_concurrent_streams),
                (SettingCodes.MAX_HEADER_LIST_SIZE, limits.max_header_list_size),
            )
            if value is not None
        }
        if not changes:
            return
        # grpclib builds h2's connection itself and sends its first SETTINGS at once;
        # these follow in a second frame (as grpclib does for its window size). h2
        # applies its own settings when the client acknowledges them; the header limit
        # holds from the first byte instead, on the decoder that enforces it.
        connection = self.connection._connection
        connection.update_settings(changes)
        if limits.max_header_list_size is not None:
            connection.decoder.max_header_list_size = limits.max_header_list_size
        self.connection.flush()

    def _go_away(self) -> None:
        """The connection reached its age: GOAWAY, then close once its streams end."""
        self._age_timer = None
        max_age = self.limits.max_age
        if max_age is None or self.connection.is_closing():
            return
        h2_connection = self.connection._connection
        self.last_stream_id = h2_connection.highest_inbound_stream_id
        # Written past h2: its close_connection() would also stop the running streams
        # (h2 refuses every frame after a GOAWAY it sent), and they are to finish. What
        # h2 has buffered goes first, so the frame lands between whole frames.
        self.connection.flush()
        goaway = GoAwayFrame(
            stream_id=0, last_stream_id=self.last_stream_id, error_code=ErrorCodes.NO_ERROR
        )
        goaway.additional_data = b"max_age"
        self.connection._transport.write(goaway.serialize())
        running = len(self.processor.streams)
        log.debug(
            "gRPC connection reached its maximum age: GOAWAY sent, %d streams running",
            running,
            extra={"running": running},
        )
        if not running:
            self._close()
            return
        loop = asyncio.get_running_loop()
        self._grace_timer = loop.call_later(max_age.grace_s, self._grace_over)

    def stream_released(self) -> None:
        if self.last_stream_id is not None and not self.processor.streams:
            # After grpclib has finished with the stream (its final frames are written).
            asyncio.get_running_loop().call_soon(self._close)

    def _grace_over(self) -> None:
        self._grace_timer = None
        running = len(self.processor.streams)
        if running:
            log.warning(
                "an aged gRPC connection still had %d streams at the end of its grace "
                "period: closing it under them",
                running,
                extra={"running": running},
            )
        self._close()

    def _close(self) -> None:
        self._cancel_timers()
        if not self.connection.is_closing():
            # Cancels what still runs (the grace is over); the transport sends what it
            # holds before it closes.
            self.processor.close("the connection reached its maximum age")

    def _cancel_timers(self) -> None:
        for timer in (self._age_timer, self._grace_timer):
            if timer is not None:
                timer.cancel()
        self._age_timer = self._grace_timer = None

    def connection_lost(self, exc: BaseException | None) -> None:
        self._cancel_timers()
        super().connection_lost(exc)


class _LimitedServer(Server):  # type: ignore[misc]
    def __init__(
        self,
        handlers: list[Any],
        limits: ConnectionLimits,
        on_unknown_method: Callable[[], None] | None,
    ) -> None:
        super().__init__(handlers)
        self._limits = limits
        self._on_unknown_method = on_unknown_method

    def _protocol_factory(self) -> H2Protocol:
        protocol = super()._protocol_factory()
        limited = _LimitedProtocol(protocol.handler, protocol.config, protocol.h2_config)
        limited.limits = self._limits
        limited.known_paths = frozenset(self._mapping)
        limited.on_unknown_method = self._on_unknown_method
        return limited


def _check_metadata(stream: Stream[Any, Any], limit: int | None) -> None:
    size = metadata_bytes(stream.metadata)
    if limit is not None and size > limit:
        log.warning("refused a call with %d bytes of metadata (limit %d)", size, limit)
        raise GRPCError(
            Status.RESOURCE_EXHAUSTED,
            f"the request metadata is {size} bytes; this server accepts at most {limit} "
            f"({METADATA_LIMIT_SETTING})",
        )


class AsyncioGrpcServer:
    """grpclib's Server driven from trio; `on_unknown_method` is told of each call to a
    method no handler serves (grpclib answers it UNIMPLEMENTED)."""

    def __init__(
        self,
        handlers: Collection[Any],
        limits: ConnectionLimits = ConnectionLimits(),
        on_unknown_method: Callable[[], None] | None = None,
    ) -> None:
        self._server = _LimitedServer(list(handlers), limits, on_unknown_method)
        self._port: int | None = None

    @property
    def port(self) -> int:
        """The bound port (useful when asked for port 0)."""
        if self._port is None:
            raise RuntimeError("the gRPC server is not started")
        return self._port

    async def start(self, host: str, port: int, ssl_context: ssl.SSLContext | None) -> None:
        await trio_asyncio.aio_as_trio(self._server.start)(host, port, ssl=ssl_context)
        listener = self._server._server  # asyncio.Server; grpclib has no public accessor
        sockets = listener.sockets if listener is not None else ()
        self._port = int(sockets[0].getsockname()[1]) if sockets else port

    def stop_listening(self) -> None:
        """Refuse new connections; calls on open connections keep running."""
        listener = self._server._server
        if listener is not None:
            listener.close()

    async def close(self, timeout_s: float) -> bool:
        """Cancel every call still running and wait, at most `timeout_s`, until all
        handlers have returned; False if they had not by then."""
        listener = self._server._server
        self._server.close()
        # From Python 3.12 asyncio's wait_closed also waits for every client connection
        # to end, and a gateway keeps its channel open: close them (3.13 has the API).
        close_clients = getattr(listener, "close_clients", None)
        if close_clients is not None:
            close_clients()
        # Shielded so that a stop already being cancelled still waits for the handlers,
        # bounded so that a connection that never closes cannot hold the process.
        with trio.move_on_after(timeout_s, shield=True) as scope:
            await trio_asyncio.aio_as_trio(self._handlers_closed)()
        return not scope.cancelled_caught

    async def _handlers_closed(self) -> None:
        # What grpclib's Server.wait_closed waits for, minus asyncio's own wait_closed,
        # which from Python 3.12 also waits for every client connection to end (and
        # Python 3.12 has no close_clients to end them).
        handlers = list(self._server._handlers)
        if handlers:
            await asyncio.gather(*(handler.wait_closed() for handler in handlers))
