"""The gRPC server inside the program's nursery: services, health, reflection, TLS, stop.

Stopping (after `shutdown_event` is set; the caller has already marked the state
stopping, so new calls get UNAVAILABLE and health says NOT_SERVING): stop listening,
let running generations finish for up to ``server.grace_period_s``, cancel the rest
(UNAVAILABLE "server is shutting down"), then close every remaining call (health
watches) and the loop.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import trio
from grpclib.reflection.service import ServerReflection

from llm_local.serving import Code
from llm_local.settings.schema import ServerSettings
from llm_local.transport.grpc.bridge import (
    AsyncioGrpcServer,
    CallLimits,
    ConnectionLimits,
    HandlerTracker,
    asyncio_loop,
)
from llm_local.transport.grpc.connection_age import ConnectionAge
from llm_local.transport.grpc.health import StateHealth
from llm_local.transport.grpc.services import (
    LLAMA_SERVICE,
    LOCAL_SERVICE,
    LlamaService,
    LLMLocalService,
)
from llm_local.transport.tls import server_ssl_context

if TYPE_CHECKING:
    from llm_local.service import Service
    from llm_local.serving import GenerationFlow

log = logging.getLogger(__name__)

# The header block a connection decodes at most, whatever the metadata limit: h2's own
# default, or this many times the limit when that is larger.
HEADER_BLOCK_FLOOR = 2**16
HEADER_BLOCK_FACTOR = 4
# How long closing may wait for grpclib's handlers once every call was cancelled.
CLOSE_TIMEOUT_S = 5.0


def build_handlers(
    service: Service, flow: GenerationFlow, tracker: HandlerTracker | None = None
) -> list[Any]:
    """The generation services (their calls counted by `tracker`), health, reflection."""
    limits = service.settings.limits
    call_limits = CallLimits(limits.grpc_max_message_bytes, limits.grpc_max_metadata_bytes)
    services: list[Any] = [
        LlamaService(flow, tracker, call_limits),
        LLMLocalService(flow, tracker, call_limits),
        StateHealth(service.state, (LLAMA_SERVICE, LOCAL_SERVICE)),
    ]
    return services + list(ServerReflection.extend(services))


def connection_age(settings: ServerSettings) -> ConnectionAge | None:
    """The connections' maximum age from settings; None when switched off (0)."""
    if settings.grpc_max_connection_age_s <= 0:
        return None
    return ConnectionAge(
        settings.grpc_max_connection_age_s, settings.grpc_max_connection_age_grace_s
    )


async def serve_grpc(
    service: Service,
    flow: GenerationFlow,
    *,
    shutdown_event: trio.Event,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until `shutdown_event` is set, then stop gracefully; reports the bound port."""
    settings = service.settings
    ssl_context = server_ssl_context(settings.tls)
    async with asyncio_loop():
        tracker = HandlerTracker()
        limits = settings.limits
        server = AsyncioGrpcServer(
            build_handlers(service, flow, tracker),
            ConnectionLimits(
                max_concurrent_streams=limits.grpc_max_concurrent_streams,
                # Metadata over the call limit gets RESOURCE_EXHAUSTED on its own call;
                # only far beyond it (a header bomb) does the connection close.
                max_header_list_size=max(
                    HEADER_BLOCK_FLOOR, HEADER_BLOCK_FACTOR * limits.grpc_max_metadata_bytes
                ),
                max_age=connection_age(settings.server),
            ),
            # A call to a method nobody serves never reaches a service: counted here.
            on_unknown_method=lambda: flow.refused(None, Code.UNIMPLEMENTED),
        )
        await server.start(settings.server.host, settings.server.grpc_port, ssl_context)
        mode = "plain h2c"
        if settings.tls.enabled:
            mode = "mTLS" if settings.tls.mutual else "TLS"
        log.info(
            "gRPC listening on %s:%d (%s)",
            settings.server.host,
            server.port,
            mode,
            extra={"port": server.port, "tls": mode},
        )
        task_status.started(server.port)
        try:
            await shutdown_event.wait()
        finally:
            with trio.CancelScope(shield=True):
                await _stop(server, flow, tracker, settings.server.grace_period_s)


async def _stop(
    server: AsyncioGrpcServer,
    flow: GenerationFlow,
    tracker: HandlerTracker,
    grace_period_s: float,
) -> None:
    server.stop_listening()
    running = flow.in_flight
    if running:
        log.info(
            "waiting up to %.1f s for %d running streams to finish",
            grace_period_s,
            running,
            extra={"running": running},
        )
    cancelled = await flow.drain(grace_period_s)
    if cancelled:
        log.warning(
            "grace period over: cancelled %d streams (UNAVAILABLE)",
            cancelled,
            extra={"cancelled": cancelled},
        )
    closed = False
    with trio.move_on_after(CLOSE_TIMEOUT_S):
        # Until every generation call has sent its final status; then the rest (health
        # watches) is cancelled.
        await tracker.wait_idle()
        closed = await server.close(CLOSE_TIMEOUT_S)
    if not closed:
        log.warning("gRPC calls did not close within %.0f s; leaving them", CLOSE_TIMEOUT_S)
    log.info("gRPC server stopped")
