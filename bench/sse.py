"""Just enough HTTP/1.1 to read llama.cpp's streamed `/completion` answers. No I/O here.

The project has no HTTP client library in its environment (and one more dependency for
the benchmark alone is not worth it): the llama.cpp scenario writes its request on an
asyncio stream and feeds what it reads to these incremental decoders.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum, auto


class ProtocolError(Exception):
    """The peer's bytes are not the HTTP/SSE this module understands."""


def parse_response_head(head: bytes) -> tuple[int, dict[str, str]]:
    """Status code and headers (names lower-cased) of a response head ending in CRLFCRLF."""
    lines = head.decode("latin-1").split("\r\n")
    status_line = lines[0].split(" ", 2)
    if len(status_line) < 2 or not status_line[0].startswith("HTTP/"):
        raise ProtocolError(f"not an HTTP status line: {lines[0]!r}")
    try:
        status = int(status_line[1])
    except ValueError:
        raise ProtocolError(f"not an HTTP status line: {lines[0]!r}") from None
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, separator, value = line.partition(":")
        if not separator:
            raise ProtocolError(f"malformed header line: {line!r}")
        headers[name.strip().lower()] = value.strip()
    return status, headers


class _ChunkState(Enum):
    SIZE = auto()
    DATA = auto()
    DATA_END = auto()
    DONE = auto()


class ChunkedDecoder:
    """Incremental decoder of the chunked transfer coding (trailers are ignored)."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._state = _ChunkState.SIZE
        self._remaining = 0

    @property
    def done(self) -> bool:
        """The last (zero-size) chunk was seen."""
        return self._state is _ChunkState.DONE

    def feed(self, data: bytes) -> bytes:
        """Payload bytes decoded from `data` and what was buffered before it."""
        self._buffer += data
        payload = bytearray()
        while self._state is not _ChunkState.DONE:
            if self._state is _ChunkState.SIZE:
                end = self._buffer.find(b"\r\n")
                if end < 0:
                    break
                size_text = bytes(self._buffer[:end]).split(b";", 1)[0].strip()
                try:
                    size = int(size_text, 16)
                except ValueError:
                    raise ProtocolError(f"bad chunk size line: {size_text!r}") from None
                del self._buffer[: end + 2]
                if size == 0:
                    self._state = _ChunkState.DONE
                else:
                    self._remaining = size
                    self._state = _ChunkState.DATA
            elif self._state is _ChunkState.DATA:
                if not self._buffer:
                    break
                taken = min(self._remaining, len(self._buffer))
                payload += self._buffer[:taken]
                del self._buffer[:taken]
                self._remaining -= taken
                if self._remaining == 0:
                    self._state = _ChunkState.DATA_END
            else:  # DATA_END: the CRLF after a chunk's data
                if len(self._buffer) < 2:
                    break
                if self._buffer[:2] != b"\r\n":
                    raise ProtocolError("chunk data not followed by CRLF")
                del self._buffer[:2]
                self._state = _ChunkState.SIZE
        return bytes(payload)


@dataclass(frozen=True, slots=True)
class ServerSentEvent:
    field: str  # "data", or "error" (llama.cpp reports failures in an `error:` field)
    value: str


class SSEParser:
    """Incremental parser of a text/event-stream body into its data (and error) fields.

    Fields of one event are joined with newlines as the SSE specification says; events
    without a data or error field (comments, keep-alives) yield nothing.
    """

    _KEPT_FIELDS = ("data", "error")

    def __init__(self) -> None:
        self._pending = b""
        self._fields: dict[str, list[str]] = {}

    def feed(self, data: bytes) -> list[ServerSentEvent]:
        self._pending += data
        events: list[ServerSentEvent] = []
        while True:
            end = self._pending.find(b"\n")
            if end < 0:
                break
            raw_line = self._pending[:end]
            self._pending = self._pending[end + 1 :]
            line = raw_line.rstrip(b"\r").decode("utf-8")
            if not line:
                events.extend(self._dispatch())
                continue
            if line.startswith(":"):
                continue  # a comment
            name, _, value = line.partition(":")
            if name in self._KEPT_FIELDS:
                self._fields.setdefault(name, []).append(value.removeprefix(" "))
        return events

    def _dispatch(self) -> list[ServerSentEvent]:
        events = [
            ServerSentEvent(name, "\n".join(self._fields[name]))
            for name in self._KEPT_FIELDS
            if name in self._fields
        ]
        self._fields = {}
        return events
