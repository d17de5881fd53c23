"""A scale-out reaches a gateway that never reconnects by itself: the connection age.

A gateway keeps one HTTP/2 connection per address it dialled. Behind a Kubernetes
Service that connection is pinned to the pod it first reached, and pods added later get
none of its calls until the connection ends. Here, with processes for pods:

- `ServiceProxy` stands for the Service: one address, forwarding each new TCP
  connection to an endpoint. It sends each to the replica that started last (a real
  Service picks at random or by fewest connections; always the newest makes the outcome
  certain: any call on a new connection lands on the new replica). It also reads the
  HTTP/2 frames the replicas send, to see the GOAWAY and what followed it.
- The client is grpcio's channel to that one address (pick_first, as a gateway dials a
  Service name). After a GOAWAY it opens no new call on that connection: the next call
  makes it connect again (and, with a ``dns:`` target, resolve the name again first),
  which is what carries it to the new replica.

Replica A (connection age 1 s, grace 60 s) serves a long stream; replica B starts; once
every connection to A has been told to go, the next calls reach B. The stream on A,
running when its connection's GOAWAY came, ends OK and whole.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest

from llm_local.proto.sentiric.llm.v1 import llama_pb2

from ..e2e.conftest import ServerProcess, start_server_process

pytestmark = [pytest.mark.e2e, pytest.mark.model]

MAX_AGE_S = 1.0
GRACE_S = 60.0  # far longer than the stream: it must never be what ends it
COUNTING = "Write the numbers from 1 to 1000, separated by commas."
STREAM_TOKENS = 160
NEXT_CALLS = 4
RPC = "LlamaService"
FRAME_HEADER = 9
DATA, GOAWAY = 0x0, 0x7


@dataclass
class Forwarded:
    """One client connection the proxy forwarded: where to, and the frames that came back
    (type, stream id), in order."""

    endpoint: str
    frames: list[tuple[int, int]] = field(default_factory=list)
    closed: bool = False

    @property
    def told_to_go(self) -> bool:
        return any(kind == GOAWAY for kind, _ in self.frames)

    def data_after_goaway(self) -> list[int]:
        """The streams that got DATA after the first GOAWAY."""
        kinds = [kind for kind, _ in self.frames]
        if GOAWAY not in kinds:
            return []
        start = kinds.index(GOAWAY)
        return [stream for kind, stream in self.frames[start:] if kind == DATA]


class ServiceProxy:
    """A TCP address forwarding each new connection to the newest endpoint."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._endpoints: list[tuple[str, int]] = []
        self.connections: list[Forwarded] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def add_endpoint(self, name: str, port: int) -> None:
        with self._lock:
            self._endpoints.append((name, port))

    def forwarded(self) -> list[Forwarded]:
        """The connections forwarded so far."""
        with self._lock:
            return list(self.connections)

    def close(self) -> None:
        self._listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            with self._lock:
                name, port = self._endpoints[-1]
                forwarded = Forwarded(name)
                self.connections.append(forwarded)
            upstream = socket.create_connection(("127.0.0.1", port))
            threading.Thread(target=_pump, args=(client, upstream, None), daemon=True).start()
            threading.Thread(target=_pump, args=(upstream, client, forwarded), daemon=True).start()


def _pump(source: socket.socket, sink: socket.socket, record: Forwarded | None) -> None:
    """Copy until EOF; with `record`, parse the server's frames on the way."""
    pending = b""
    try:
        while data := source.recv(65536):
            sink.sendall(data)
            if record is None:
                continue
            pending += data
            while len(pending) >= FRAME_HEADER:
                length = int.from_bytes(pending[:3], "big")
                if len(pending) < FRAME_HEADER + length:
                    break
                kind = pending[3]
                (stream_id,) = struct.unpack("!I", pending[5:9])
                record.frames.append((kind, stream_id & 0x7FFFFFFF))
                pending = pending[FRAME_HEADER + length :]
    except OSError:
        pass
    finally:
        if record is not None:
            record.closed = True
        for end in (sink, source):
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)


@pytest.fixture
def proxy() -> Iterator[ServiceProxy]:
    service = ServiceProxy()
    yield service
    service.close()


def replica_env() -> dict[str, str]:
    return {
        "LLM_LOCAL_SERVICE_SERVER__GRPC_MAX_CONNECTION_AGE_S": str(MAX_AGE_S),
        "LLM_LOCAL_SERVICE_SERVER__GRPC_MAX_CONNECTION_AGE_GRACE_S": str(GRACE_S),
    }


def ok_calls(server: ServerProcess) -> float:
    return server.metric("llm_local_requests_total", {"service": RPC, "code": "OK"}) or 0.0


def until(condition: Any, what: str, timeout: float = 120.0) -> None:
    """Poll `condition`; the limit only keeps a broken server from hanging the suite."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_after_the_age_new_calls_reach_a_replica_started_later_and_no_stream_is_cut(
    tmp_path_factory: pytest.TempPathFactory, proxy: ServiceProxy, rpc: Any
) -> None:
    log_dir = tmp_path_factory.mktemp("replica-logs")
    old = start_server_process(log_dir, replica_env())
    proxy.add_endpoint("old", old.grpc_port)
    channel = grpc.insecure_channel(f"127.0.0.1:{proxy.port}")
    new: ServerProcess | None = None
    try:
        request = llama_pb2.GenerateStreamRequest(
            user_prompt=COUNTING,
            params=llama_pb2.GenerationParams(max_new_tokens=STREAM_TOKENS),
        )
        stream = rpc.llama(channel, request, timeout=300)
        responses: list[llama_pb2.GenerateStreamResponse] = []
        reader = threading.Thread(target=lambda: responses.extend(stream), daemon=True)
        reader.start()

        new = start_server_process(log_dir, replica_env())
        proxy.add_endpoint("new", new.grpc_port)
        before_new = proxy.forwarded()
        # Every connection to the old replica opened before the new one was in the
        # Service has been told to go (or is gone): the client must connect again.
        until(
            lambda: all(c.told_to_go or c.closed for c in before_new),
            "a GOAWAY on every connection to the old replica",
        )
        short = llama_pb2.GenerateStreamRequest(
            user_prompt="Say hi.", params=llama_pb2.GenerationParams(max_new_tokens=2)
        )
        next_calls = [list(rpc.llama(channel, short, timeout=60)) for _ in range(NEXT_CALLS)]

        reader.join(300)
        assert not reader.is_alive()
        old_ok, new_ok = ok_calls(old), ok_calls(new)
    finally:
        channel.close()
        for server in (old, new):
            if server is not None:
                server.stop()

    # The stream: on the old replica, running when its connection was told to go, ended
    # OK with all its tokens.
    assert stream.code() == grpc.StatusCode.OK
    assert responses[-1].finish_details.completion_tokens == STREAM_TOKENS
    (carrying,) = [c for c in before_new if c.endpoint == "old" and c.data_after_goaway()]
    assert carrying.told_to_go
    # The next calls: all on the new replica, none on the old one.
    assert all(call[-1].HasField("finish_details") for call in next_calls)
    assert new_ok == NEXT_CALLS
    assert old_ok == 1
    assert all(c.endpoint == "new" for c in proxy.forwarded()[len(before_new) :])
