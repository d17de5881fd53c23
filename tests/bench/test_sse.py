"""bench/sse.py: chunked decoding and server-sent events, however the bytes are split."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bench.sse import (
    ChunkedDecoder,
    ProtocolError,
    ServerSentEvent,
    SSEParser,
    parse_response_head,
)

STREAM_BODY = (
    b'data: {"content":"Hel","stop":false}\n\n'
    b": keep-alive comment\n\n"
    b'data: {"content":"lo \xc3\xa9","stop":false}\r\n\r\n'
    b'data: {"content":"","stop":true,"tokens_predicted":2}\n\n'
)
EXPECTED_EVENTS = [
    ServerSentEvent("data", '{"content":"Hel","stop":false}'),
    ServerSentEvent("data", '{"content":"lo é","stop":false}'),
    ServerSentEvent("data", '{"content":"","stop":true,"tokens_predicted":2}'),
]


def chunked(payload: bytes, sizes: list[int]) -> bytes:
    """`payload` in the chunked transfer coding, cut into chunks of `sizes` (cycled)."""
    out = bytearray()
    position, index = 0, 0
    while position < len(payload):
        size = sizes[index % len(sizes)]
        piece = payload[position : position + size]
        out += f"{len(piece):x};ext=1\r\n".encode() + piece + b"\r\n"
        position += size
        index += 1
    return bytes(out + b"0\r\n\r\n")


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({cut % (len(data) + 1) for cut in cuts})
    edges = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges)]


@given(
    sizes=st.lists(st.integers(1, 40), min_size=1, max_size=5),
    cuts=st.lists(st.integers(0, 10_000), max_size=12),
)
def test_chunked_then_sse_recovers_every_event(sizes: list[int], cuts: list[int]) -> None:
    decoder = ChunkedDecoder()
    parser = SSEParser()
    events = []
    for piece in split(chunked(STREAM_BODY, sizes), cuts):
        events += parser.feed(decoder.feed(piece))
    assert events == EXPECTED_EVENTS
    assert decoder.done


def test_chunked_decoder_ignores_bytes_after_the_last_chunk() -> None:
    decoder = ChunkedDecoder()
    assert decoder.feed(b"3\r\nabc\r\n0\r\n\r\nHTTP/1.1 200 OK") == b"abc"
    assert decoder.done


@pytest.mark.parametrize("data", [b"zz\r\n", b"3\r\nabcXY"], ids=["bad size", "no CRLF after data"])
def test_chunked_decoder_rejects_malformed_input(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        ChunkedDecoder().feed(data)


def test_sse_joins_multi_line_data_and_keeps_error_fields() -> None:
    parser = SSEParser()
    events = parser.feed(b'data: a\ndata: b\n\nerror: {"code":500}\n\n')
    assert events == [ServerSentEvent("data", "a\nb"), ServerSentEvent("error", '{"code":500}')]


def test_sse_waits_for_the_blank_line() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: partial\n") == []
    assert parser.feed(b"\n") == [ServerSentEvent("data", "partial")]


def test_response_head_is_parsed() -> None:
    status, headers = parse_response_head(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    assert status == 200
    assert headers["transfer-encoding"] == "chunked"
    assert headers["content-type"] == "text/event-stream"


@pytest.mark.parametrize("head", [b"garbage\r\n\r\n", b"HTTP/1.1 abc\r\n\r\n"])
def test_response_head_rejects_what_is_not_http(head: bytes) -> None:
    with pytest.raises(ProtocolError, match="status line"):
        parse_response_head(head)
