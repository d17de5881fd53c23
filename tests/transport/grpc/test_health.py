"""grpc.health.v1.Health follows the service state; grpcio client, grpclib's messages."""

from __future__ import annotations

import queue
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest
import trio
from grpclib.health.v1.health_pb2 import HealthCheckRequest, HealthCheckResponse

StartServer = Callable[..., Awaitable[Any]]  # the start_server fixture (conftest.py)

NAMES = ["", "sentiric.llm.v1.LlamaService", "sentiric.llm.v1.LLMLocalService"]
SERVING = HealthCheckResponse.SERVING
NOT_SERVING = HealthCheckResponse.NOT_SERVING


def check(channel: grpc.Channel, service: str) -> int:
    method = channel.unary_unary(
        "/grpc.health.v1.Health/Check",
        request_serializer=HealthCheckRequest.SerializeToString,
        response_deserializer=HealthCheckResponse.FromString,
    )
    response: HealthCheckResponse = method(HealthCheckRequest(service=service), timeout=5)
    return response.status


def watch(channel: grpc.Channel, service: str) -> Any:
    method = channel.unary_stream(
        "/grpc.health.v1.Health/Watch",
        request_serializer=HealthCheckRequest.SerializeToString,
        response_deserializer=HealthCheckResponse.FromString,
    )
    return method(HealthCheckRequest(service=service), timeout=10)


@pytest.mark.parametrize("name", NAMES)
async def test_check_is_not_serving_while_loading_then_serving(
    start_server: StartServer, name: str
) -> None:
    server = await start_server(ready=False)

    assert await server.call(check, server.channel, name) == NOT_SERVING
    await server.backend.load()
    server.service.state.mark_ready(server.backend.info)
    assert await server.call(check, server.channel, name) == SERVING
    server.service.state.mark_stopping()
    assert await server.call(check, server.channel, name) == NOT_SERVING


async def test_check_of_an_unknown_service_is_not_found(start_server: StartServer) -> None:
    server = await start_server()

    error = await server.call(server.error, lambda: check(server.channel, "no.such.Service"))

    assert error.code() == grpc.StatusCode.NOT_FOUND


async def test_watch_streams_every_change(start_server: StartServer) -> None:
    server = await start_server(ready=False)
    state = server.service.state
    statuses: queue.Queue[int] = queue.Queue()
    stream = watch(server.channel, "sentiric.llm.v1.LlamaService")

    def collect() -> None:
        try:
            for response in stream:
                statuses.put(response.status)
        except grpc.RpcError:
            pass  # cancelled at the end of the test

    reader = threading.Thread(target=collect, daemon=True)
    reader.start()

    async def next_status() -> int:
        with trio.fail_after(5):
            while True:
                try:
                    return statuses.get_nowait()
                except queue.Empty:
                    await trio.sleep(0.01)

    assert await next_status() == NOT_SERVING
    state.mark_loading("still loading")  # a change that keeps the status: nothing sent
    await server.backend.load()
    state.mark_ready(server.backend.info)
    assert await next_status() == SERVING
    state.mark_stopping()
    assert await next_status() == NOT_SERVING
    stream.cancel()
    await trio.to_thread.run_sync(reader.join, 5)
    assert statuses.empty()


async def test_watch_of_an_unknown_service_says_so(start_server: StartServer) -> None:
    server = await start_server()
    stream = watch(server.channel, "no.such.Service")

    first = await server.call(next, stream)

    assert first.status == HealthCheckResponse.SERVICE_UNKNOWN
    stream.cancel()
