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
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Sequence
from contextlib import asynccontextmanager
from typing import Any

import grpclib.utils
import trio
import trio_asyncio
from grpclib.const import Status
from grpclib.exceptions import GRPCError, StreamTerminatedError
from grpclib.server import Server, Stream
from h2.exceptions import StreamClosedError

from llm_local.serving import ClientGone

GrpclibHandler = Callable[[Stream[Any, Any]], Awaitable[None]]

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


class TrioStream:
    """A grpclib server stream as seen from trio code."""

    def __init__(self, stream: Stream[Any, Any]) -> None:
        self._stream = stream

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
        return await trio_asyncio.aio_as_trio(self._stream.recv_message)()

    async def send_message(self, message: Any) -> None:
        await self.send_messages((message,))

    async def send_messages(self, messages: Sequence[Any]) -> None:
        """Send several messages with one crossing into asyncio."""
        try:
            await trio_asyncio.aio_as_trio(_send_all)(self._stream, messages)
        except StreamTerminatedError as exc:
            raise ClientGone(str(exc)) from exc


async def _send_all(stream: Stream[Any, Any], messages: Sequence[Any]) -> None:
    for message in messages:
        await stream.send_message(message)


TrioBody = Callable[[TrioStream], Awaitable[None]]


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


def trio_handler(body: TrioBody, tracker: HandlerTracker | None = None) -> GrpclibHandler:
    """A grpclib handler that runs `body` as a trio task.

    The call ends with OK when `body` returns, or with the status of the GRPCError it
    raises; other exceptions reach grpclib (UNKNOWN). Cancelling the handler (client
    gone, deadline) cancels `body`. The final status is sent here rather than by
    grpclib after the handler returns, so that `tracker` goes idle only once every
    tracked call has told its client how it ended.
    """

    async def handler(stream: Stream[Any, Any]) -> None:
        if tracker is not None:
            tracker._enter()
        try:
            try:
                await trio_asyncio.trio_as_aio(body)(TrioStream(stream))
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


class AsyncioGrpcServer:
    """grpclib's Server driven from trio."""

    def __init__(self, handlers: Collection[Any]) -> None:
        self._server = Server(list(handlers))
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
