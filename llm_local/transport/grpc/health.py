"""``grpc.health.v1.Health`` driven by the service state.

SERVING when the model is ready, NOT_SERVING while it loads, after it failed, and
while the server stops; the same for the overall name ``""`` and for each generation
service. Watch sends the current status, then every change, until the client leaves.

grpclib's own Health service polls check functions; here the state announces its
changes (`ServiceState.wait_for_change`), so Watch reacts at once and costs nothing
while idle. The messages are grpclib's generated ones.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import trio
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from grpclib.health.v1.health_grpc import HealthBase
from grpclib.health.v1.health_pb2 import HealthCheckRequest, HealthCheckResponse
from grpclib.server import Stream

from llm_local.core.state import ServiceState
from llm_local.transport.grpc.bridge import TrioStream, trio_handler


class StateHealth(HealthBase):  # type: ignore[misc]
    def __init__(self, state: ServiceState, service_names: Collection[str]) -> None:
        self._state = state
        self._names = frozenset({"", *service_names})
        self._check = trio_handler(self._check_body)
        self._watch = trio_handler(self._watch_body)

    async def Check(self, stream: Stream[Any, Any]) -> None:
        await self._check(stream)

    async def Watch(self, stream: Stream[Any, Any]) -> None:
        await self._watch(stream)

    def _status(self) -> HealthCheckResponse.ServingStatus.ValueType:
        if self._state.is_ready:
            return HealthCheckResponse.SERVING
        return HealthCheckResponse.NOT_SERVING

    async def _check_body(self, stream: TrioStream) -> None:
        request: HealthCheckRequest = await stream.recv_message()
        if request.service not in self._names:
            raise GRPCError(Status.NOT_FOUND, f"unknown service {request.service!r}")
        await stream.send_message(HealthCheckResponse(status=self._status()))

    async def _watch_body(self, stream: TrioStream) -> None:
        request: HealthCheckRequest = await stream.recv_message()
        if request.service not in self._names:
            # The protocol: say so, and keep the call open (the name may appear later;
            # here it never does).
            await stream.send_message(
                HealthCheckResponse(status=HealthCheckResponse.SERVICE_UNKNOWN)
            )
            await trio.sleep_forever()
        version = self._state.version
        sent = self._status()
        await stream.send_message(HealthCheckResponse(status=sent))
        while True:
            version = await self._state.wait_for_change(version)
            status = self._status()
            if status != sent:
                await stream.send_message(HealthCheckResponse(status=status))
                sent = status
