"""Limits that hold, on a real server: each is refused with a status naming it, the
connection and the server stay usable, and nothing is buffered on the way.

One server per backend (ct2 and llama_cpp, only `backend` differs) with small limits:
8 KiB gRPC messages, 4 KiB of metadata, 2 calls at once per gRPC connection; on the HTTP
port 4 KiB of headers, 8 KiB bodies, 3 streams per HTTP/2 connection.
"""

from __future__ import annotations

import http.client
import json
import socket
import time
from collections.abc import Callable
from typing import Any

import grpc
import h2.config
import h2.connection
import h2.events
import pytest
from h2.settings import SettingCodes

from llm_local.proto.sentiric.llm.v1 import llama_pb2
from tests.e2e.conftest import SUITE_BACKENDS, backend_env

pytestmark = [pytest.mark.e2e, pytest.mark.model]

MESSAGE_LIMIT = 8192
METADATA_LIMIT = 4096
STREAMS_PER_CONNECTION = 2
HEADER_LIMIT = 4096
BODY_LIMIT = 8192
HTTP_STREAMS = 3
COUNTING = "Write the numbers from 1 to 1000, separated by commas."


@pytest.fixture(scope="module", params=SUITE_BACKENDS)
def server(serve: Callable[..., Any], request: pytest.FixtureRequest) -> Any:
    return serve(
        env={
            **backend_env(request.param),
            "LLM_LOCAL_SERVICE_LIMITS__GRPC_MAX_MESSAGE_BYTES": str(MESSAGE_LIMIT),
            "LLM_LOCAL_SERVICE_LIMITS__GRPC_MAX_METADATA_BYTES": str(METADATA_LIMIT),
            "LLM_LOCAL_SERVICE_LIMITS__GRPC_MAX_CONCURRENT_STREAMS": str(STREAMS_PER_CONNECTION),
            "LLM_LOCAL_SERVICE_LIMITS__HTTP_MAX_HEADER_BYTES": str(HEADER_LIMIT),
            "LLM_LOCAL_SERVICE_LIMITS__HTTP_MAX_CONCURRENT_STREAMS": str(HTTP_STREAMS),
            "LLM_LOCAL_SERVICE_OPENAI__MAX_BODY_BYTES": str(BODY_LIMIT),
        }
    )


def request(prompt: str = "Say hi.", max_new_tokens: int = 2) -> llama_pb2.GenerateStreamRequest:
    return llama_pb2.GenerateStreamRequest(
        user_prompt=prompt, params=llama_pb2.GenerationParams(max_new_tokens=max_new_tokens)
    )


def answered(rpc: Any, channel: grpc.Channel) -> int:
    """A short generation on `channel` succeeds; returns its completion tokens."""
    responses = list(rpc.llama(channel, request(), timeout=60))
    return int(responses[-1].finish_details.completion_tokens)


def test_a_request_message_over_the_limit_is_resource_exhausted_naming_it(
    server: Any, rpc: Any
) -> None:
    channel = server.channel()
    too_large = request("a" * (MESSAGE_LIMIT + 100))

    error = rpc.error(lambda: list(rpc.llama(channel, too_large, timeout=30)))
    local_error = rpc.error(lambda: list(rpc.local(channel, "b" * (MESSAGE_LIMIT + 100))))

    for refused in (error, local_error):
        assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "limits.grpc_max_message_bytes" in refused.details()
        assert str(MESSAGE_LIMIT) in refused.details()
    # Just under the limit is a normal request (long prompt, INVALID_ARGUMENT or OK, not
    # a size refusal), and the same connection keeps serving.
    assert answered(rpc, channel) == 2
    assert "refused a request message of" in server.log_text()


def test_metadata_over_the_limit_is_refused_and_the_connection_survives(
    server: Any, rpc: Any
) -> None:
    channel = server.channel()
    assert answered(rpc, channel) == 2  # the client has the server's settings now
    metadata = (("x-tenant-id", "t1"), ("x-padding", "p" * (METADATA_LIMIT * 2)))

    error = rpc.error(lambda: list(rpc.llama(channel, request(), metadata=metadata)))

    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "limits.grpc_max_metadata_bytes" in error.details()
    assert answered(rpc, channel) == 2


def test_a_header_bomb_closes_only_its_own_connection(server: Any, rpc: Any) -> None:
    bomb = server.channel(**{"grpc.use_local_subchannel_pool": 1})
    metadata = (("x-padding", "p" * 100_000),)  # beyond what any connection decodes

    error = rpc.error(lambda: list(rpc.llama(bomb, request(), metadata=metadata)))

    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert answered(rpc, server.channel()) == 2
    assert server.http_get("/health")[0] == 200


def test_calls_beyond_the_stream_limit_wait_on_their_connection_not_on_others(
    server: Any, rpc: Any
) -> None:
    crowded = server.channel()
    # Its own connection: grpcio would otherwise share one between equal channels.
    other = server.channel(**{"grpc.use_local_subchannel_pool": 1})
    assert answered(rpc, crowded) == 2
    assert answered(rpc, other) == 2
    calls = [rpc.llama(crowded, request(COUNTING, 8)) for _ in range(STREAMS_PER_CONNECTION + 1)]

    crowded_peak = _running_peak(server, seconds=1.5)
    # Another connection is not held back by the crowded one.
    assert answered(rpc, other) == 2
    results = [list(call) for call in calls]

    assert crowded_peak == STREAMS_PER_CONNECTION
    assert all(call.code() == grpc.StatusCode.OK for call in calls)
    assert [r[-1].finish_details.completion_tokens for r in results] == [8] * len(calls)


def _running_peak(server: Any, seconds: float) -> float:
    peak = 0.0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        peak = max(peak, server.metric("llm_local_requests_running") or 0.0)
        time.sleep(0.02)
    return peak


def test_http_headers_over_the_limit_are_refused_and_the_server_answers_after(
    server: Any,
) -> None:
    connection = http.client.HTTPConnection(server.host, server.http_port, timeout=10)
    connection.putrequest("GET", "/health")
    connection.putheader("X-Padding", "p" * (HEADER_LIMIT * 2))
    connection.endheaders()
    response = connection.getresponse()
    status, body = response.status, response.read().decode()
    connection.close()

    assert status == 431
    assert "limits.http_max_header_bytes" in body
    assert server.http_get("/health")[0] == 200


def test_an_http_body_over_the_limit_is_413_naming_it(server: Any) -> None:
    body = json.dumps({"messages": [{"role": "user", "content": "x" * (BODY_LIMIT * 2)}]})
    connection = http.client.HTTPConnection(server.host, server.http_port, timeout=10)
    connection.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    response = connection.getresponse()
    status, answer = response.status, json.loads(response.read())
    connection.close()

    assert status == 413
    assert "openai.max_body_bytes" in answer["error"]["message"]
    assert server.http_get("/health")[0] == 200


def http2_settings(host: str, port: int) -> dict[int, int]:
    """Every setting the server sends on a fresh HTTP/2 connection (prior knowledge,
    no TLS), in the order sent: later frames win."""
    connection = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    connection.initiate_connection()
    settings: dict[int, int] = {}
    with socket.create_connection((host, port), timeout=5) as sock:
        sock.sendall(connection.data_to_send())
        sock.settimeout(0.5)  # the server sends its settings at once, then waits
        while True:
            try:
                data = sock.recv(65536)
            except TimeoutError:
                break
            if not data:
                break
            for event in connection.receive_data(data):
                if isinstance(event, h2.events.RemoteSettingsChanged):
                    settings.update(
                        {code: change.new_value for code, change in event.changed_settings.items()}
                    )
            sock.sendall(connection.data_to_send())
    return settings


def test_both_ports_advertise_their_stream_and_header_limits(server: Any) -> None:
    grpc_settings = http2_settings(server.host, server.grpc_port)
    http_settings = http2_settings(server.host, server.http_port)

    assert grpc_settings[SettingCodes.MAX_CONCURRENT_STREAMS] == STREAMS_PER_CONNECTION
    # The gRPC port decodes a header block up to its hard cap (the metadata limit itself
    # is checked per call, above): never less than the limit.
    assert grpc_settings[SettingCodes.MAX_HEADER_LIST_SIZE] >= METADATA_LIMIT
    assert http_settings[SettingCodes.MAX_CONCURRENT_STREAMS] == HTTP_STREAMS
    assert http_settings[SettingCodes.MAX_HEADER_LIST_SIZE] == HEADER_LIMIT
