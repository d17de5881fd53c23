"""Capacity and graceful stop of a real server: 2 generations at once, none queued.

The graceful-stop test stops a server of its own, so that the tests pass in any order.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from typing import Any

import grpc
import pytest

from llm_local.proto.sentiric.llm.v1 import llama_pb2

pytestmark = [pytest.mark.e2e, pytest.mark.model]

GRACE_PERIOD_S = 6.0  # long enough for a short stream on a busy 2-core machine
COUNTING = "Write the numbers from 1 to 1000, separated by commas."


SETTINGS = {
    "LLM_LOCAL_SERVICE_CAPACITY__MAX_CONCURRENT": "2",
    "LLM_LOCAL_SERVICE_CAPACITY__MAX_QUEUED": "0",
    "LLM_LOCAL_SERVICE_SERVER__GRACE_PERIOD_S": str(GRACE_PERIOD_S),
}


@pytest.fixture(scope="module")
def server(serve: Callable[..., Any]) -> Any:
    return serve(env=SETTINGS)


@pytest.fixture(scope="module")
def channel(server: Any) -> grpc.Channel:
    return server.channel()


def counting(max_new_tokens: int) -> llama_pb2.GenerateStreamRequest:
    return llama_pb2.GenerateStreamRequest(
        user_prompt=COUNTING, params=llama_pb2.GenerationParams(max_new_tokens=max_new_tokens)
    )


def wait_until_running(server: Any, count: int) -> None:
    deadline = time.monotonic() + 15
    while server.metric("llm_local_requests_running") != count and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.metric("llm_local_requests_running") == count


def test_over_capacity_is_rejected_quickly_while_admitted_streams_complete(
    server: Any, channel: grpc.Channel, rpc: Any
) -> None:
    admitted = [rpc.llama(channel, counting(16)) for _ in range(2)]
    wait_until_running(server, 2)

    started = time.monotonic()
    rejected = rpc.error(lambda: list(rpc.llama(channel, counting(8))))
    rejected_after = time.monotonic() - started
    local_rejected = rpc.error(lambda: list(rpc.local(channel, "Hello")))

    assert rejected.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert local_rejected.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # Nothing queued: an answer at once, not after the 30 s queue timeout (a loose bound:
    # a loaded 2-core machine may take a second or two for any call).
    assert rejected_after < 15.0
    for call in admitted:
        responses = list(call)
        assert call.code() == grpc.StatusCode.OK
        assert responses[-1].finish_details.completion_tokens == 16
    for service in ("LlamaService", "LLMLocalService"):
        assert server.metric("llm_local_requests_rejected_total", {"service": service}) == 1


def test_sigterm_lets_streams_finish_within_the_grace_period_and_exits_zero(
    serve: Callable[..., Any], rpc: Any
) -> None:
    server = serve(env=SETTINGS)
    channel = server.channel()
    short = rpc.llama(channel, counting(12))  # well within the grace period
    endless = rpc.llama(channel, counting(1500))  # far beyond it
    wait_until_running(server, 2)
    next(short)
    next(endless)

    signalled = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    refused = rpc.error(lambda: list(rpc.llama(channel, counting(4))))
    short_responses = list(short)
    cut = rpc.error(lambda: list(endless))
    status = server.process.wait(timeout=GRACE_PERIOD_S + 15)
    stopped_after = time.monotonic() - signalled

    assert refused.code() == grpc.StatusCode.UNAVAILABLE
    assert short.code() == grpc.StatusCode.OK
    assert short_responses[-1].finish_details.completion_tokens == 12
    assert cut.code() == grpc.StatusCode.UNAVAILABLE
    assert cut.details() == "server is shutting down"
    assert status == 0
    assert stopped_after < GRACE_PERIOD_S + 5
    log = server.log_text()
    assert "received SIGTERM" in log
    assert "cancelled 1 streams" in log
