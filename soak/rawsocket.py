"""Clients on plain blocking sockets, for what a well-behaved client library never does.

Clients that stop reading (usable from trio, asyncio or threads alike: after the request
is written they do no I/O at all):

- `stalled_grpc_call`: HTTP/2 with prior knowledge, an initial stream window of 0 and
  never a WINDOW_UPDATE, so the server may send headers but not one byte of a message:
  grpclib's `send_message` waits for the window (grpclib/protocol.py `send_data`).
- `stalled_sse_request`: HTTP/1.1 with a tiny receive buffer that is never read, so the
  kernel's buffers fill and hypercorn's write to the socket blocks.

Each returns the socket; closing it is the client finally going away.

And a client that vanishes: `grpc_call_then_drop` reads a few messages of a gRPC stream
and closes its TCP connection, with no RST_STREAM first (grpcio's channel.close()
cancels its calls before closing).
"""

from __future__ import annotations

import json
import socket
import struct
from collections.abc import Mapping

import h2.config
import h2.connection
import h2.events
import h2.settings

# The smallest receive buffer Linux grants is about 2 KiB (it doubles what is asked).
TINY_RECEIVE_BUFFER = 1024
# Connecting, and each read of grpc_call_then_drop (a queued call sends nothing for long).
CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 300.0


def grpc_frame(message: bytes) -> bytes:
    """One length-prefixed, uncompressed gRPC message."""
    return struct.pack(">?I", False, len(message)) + message


def stalled_grpc_call(
    port: int, method: str, message: bytes, metadata: Mapping[str, str], host: str = "127.0.0.1"
) -> socket.socket:
    """Start a unary-request gRPC call on `method` whose client never takes a byte."""
    sock, _, _ = _start_grpc_call(port, method, message, metadata, host, window=0)
    return sock


def grpc_call_then_drop(
    port: int,
    method: str,
    message: bytes,
    metadata: Mapping[str, str],
    messages: int,
    host: str = "127.0.0.1",
) -> int:
    """Read up to `messages` response messages (fewer if the stream ends), then close
    the connection without a word; the messages read."""
    sock, connection, stream_id = _start_grpc_call(port, method, message, metadata, host)
    sock.settimeout(READ_TIMEOUT_S)
    received = bytearray()
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return _count_messages(received)
            for event in connection.receive_data(data):
                if isinstance(event, h2.events.DataReceived) and event.stream_id == stream_id:
                    received += event.data
                    connection.acknowledge_received_data(
                        event.flow_controlled_length, event.stream_id
                    )
                elif isinstance(event, h2.events.StreamEnded | h2.events.StreamReset):
                    return _count_messages(received)
            if _count_messages(received) >= messages:
                return messages
            sock.sendall(connection.data_to_send())
    finally:
        sock.close()


def _count_messages(data: bytes | bytearray) -> int:
    count, position = 0, 0
    while position + 5 <= len(data):
        length = struct.unpack(">I", data[position + 1 : position + 5])[0]
        if position + 5 + length > len(data):
            break
        count += 1
        position += 5 + length
    return count


def _start_grpc_call(
    port: int,
    method: str,
    message: bytes,
    metadata: Mapping[str, str],
    host: str,
    window: int | None = None,
) -> tuple[socket.socket, h2.connection.H2Connection, int]:
    connection = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    if window is not None:
        connection.local_settings = h2.settings.Settings(
            client=True, initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window}
        )
    connection.initiate_connection()
    stream_id = connection.get_next_available_stream_id()
    headers = [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", method),
        (":authority", f"{host}:{port}"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
        *metadata.items(),
    ]
    connection.send_headers(stream_id, headers)
    connection.send_data(stream_id, grpc_frame(message), end_stream=True)
    sock = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S)
    sock.sendall(connection.data_to_send())
    return sock, connection, stream_id


def stalled_sse_request(
    port: int,
    path: str,
    body: Mapping[str, object],
    headers: Mapping[str, str],
    host: str = "127.0.0.1",
) -> socket.socket:
    """POST `body` for a streamed answer over HTTP/1.1 and never read the answer."""
    payload = json.dumps(body).encode()
    extra = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Accept: text/event-stream\r\n{extra}Content-Length: {len(payload)}\r\n\r\n"
    )
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    # Before connecting: the window the client advertises follows this buffer.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, TINY_RECEIVE_BUFFER)
    sock.settimeout(CONNECT_TIMEOUT_S)
    sock.connect((host, port))
    sock.sendall(head.encode() + payload)
    return sock
