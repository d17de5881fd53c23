"""An in-process gRPC server on the fake backend, and a blocking grpcio client for it.

The server runs in the test's trio loop; grpcio calls block, so tests make them on a
worker thread (`await harness.call(fn)`). grpcio is the client on purpose: an
implementation of gRPC independent of the grpclib server under test.

The calls themselves are tests/conftest.py's `rpc` (grpcio's generic call API with this
project's message classes), which the end-to-end tests use as well.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import grpc
import pytest
import trio

from llm_local.app import build_service
from llm_local.backends.fake import FakeBackend
from llm_local.proto.sentiric.llm.v1 import llama_pb2
from llm_local.service import Service
from llm_local.serving import GenerationFlow
from llm_local.settings.schema import AppSettings
from llm_local.transport.grpc.server import serve_grpc

T = TypeVar("T")

Metadata = Sequence[tuple[str, str]]


@dataclass
class GrpcHarness:
    service: Service
    flow: GenerationFlow
    port: int
    shutdown: trio.Event
    channel: grpc.Channel
    rpc: Any  # tests/conftest.py's Rpc: the grpcio calls, shared with the e2e tests

    @property
    def backend(self) -> FakeBackend:
        backend = self.service.backend
        assert isinstance(backend, FakeBackend)
        return backend

    async def call(self, function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a blocking grpcio call on a worker thread."""
        return await trio.to_thread.run_sync(partial(function, *args, **kwargs))

    def llama(
        self,
        request: llama_pb2.GenerateStreamRequest,
        metadata: Metadata = (),
        timeout: float | None = 10.0,
    ) -> Any:
        """The response iterator (also a grpc.Call: cancel(), code(), ...)."""
        return self.rpc.llama(self.channel, request, metadata, timeout)

    def local(self, prompt: str, metadata: Metadata = (), timeout: float | None = 10.0) -> Any:
        return self.rpc.local(self.channel, prompt, metadata, timeout)

    def error(self, call: Callable[[], object]) -> grpc.RpcError:
        """Run `call` (which consumes a stream) and return the RpcError it must raise."""
        error: grpc.RpcError = self.rpc.error(call)
        return error

    async def wait_until_idle(self, limit_s: float = 5.0) -> None:
        """Until no generation runs in the backend nor in the flow (fails after `limit_s`)."""
        with trio.fail_after(limit_s):
            # Polled: the backend's counters have no event to wait on.
            while self.backend.stats().running or self.flow.in_flight:  # noqa: ASYNC110
                await trio.sleep(0.01)


StartServer = Callable[..., Awaitable[GrpcHarness]]


@pytest.fixture
async def start_server(
    nursery: trio.Nursery, fake_settings: Callable[..., AppSettings], rpc: Any
) -> AsyncIterator[StartServer]:
    """`await start_server(fake={...}, ready=True, capacity__max_concurrent=1, ...)`."""
    channels: list[grpc.Channel] = []

    async def start(
        fake: dict[str, object] | None = None, *, ready: bool = True, **overrides: object
    ) -> GrpcHarness:
        settings = fake_settings(fake, **{"server__grace_period_s": 1.0, **overrides})
        service = build_service(settings)
        if ready:
            await service.backend.load()
            service.state.mark_ready(service.backend.info)
        flow = GenerationFlow(service)
        shutdown = trio.Event()
        port = await nursery.start(partial(serve_grpc, service, flow, shutdown_event=shutdown))
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        channels.append(channel)
        return GrpcHarness(service, flow, port, shutdown, channel, rpc)

    yield start
    for channel in channels:
        channel.close()
