"""Serving the HTTP apps with hypercorn's trio worker inside the program's nursery."""

from __future__ import annotations

import logging
from functools import partial
from typing import TYPE_CHECKING

import trio
from hypercorn.config import Config
from hypercorn.trio import serve

from llm_local.transport.http.app import create_app, create_metrics_app

if TYPE_CHECKING:
    from quart_trio import QuartTrio

    from llm_local.service import Service
    from llm_local.serving import GenerationFlow
    from llm_local.settings.schema import LimitsSettings

log = logging.getLogger(__name__)


def hypercorn_config(host: str, port: int, grace_period_s: float, limits: LimitsSettings) -> Config:
    config = Config()
    config.bind = [f"{host}:{port}"]
    config.h2_max_concurrent_streams = limits.http_max_concurrent_streams
    # One limit for headers over both protocols: h11 counts the request line and headers
    # it buffers, h2 the header list.
    config.h11_max_incomplete_size = limits.http_max_header_bytes
    config.h2_max_header_list_size = limits.http_max_header_bytes
    # Route hypercorn's lines through our handlers (JSON or text) instead of its own.
    config.errorlog = logging.getLogger("hypercorn.error")
    config.accesslog = None  # probes hit every few seconds; their lines are noise
    config.graceful_timeout = grace_period_s
    return config


async def _serve(
    app: QuartTrio,
    config: Config,
    what: str,
    shutdown_event: trio.Event,
    task_status: trio.TaskStatus[None],
) -> None:
    async with trio.open_nursery() as nursery:
        binds: list[str] = await nursery.start(
            partial(serve, app, config, shutdown_trigger=shutdown_event.wait)
        )
        log.info("%s listening on %s", what, ", ".join(binds), extra={"binds": binds})
        task_status.started()


async def serve_http(
    service: Service,
    flow: GenerationFlow | None = None,
    *,
    shutdown_event: trio.Event,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve /health, /config, /metrics (and with `flow`, the OpenAI API) until
    `shutdown_event` is set."""
    server = service.settings.server
    limits = service.settings.limits
    config = hypercorn_config(server.host, server.http_port, server.grace_period_s, limits)
    await _serve(create_app(service, flow), config, "HTTP", shutdown_event, task_status)


async def serve_metrics(
    service: Service,
    *,
    shutdown_event: trio.Event,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve only /metrics on the metrics port until `shutdown_event` is set.

    Port 0 means "metrics only at /metrics on the HTTP port": then this returns at once.
    """
    server = service.settings.server
    if server.metrics_port == 0:
        task_status.started()
        return
    limits = service.settings.limits
    config = hypercorn_config(server.host, server.metrics_port, server.grace_period_s, limits)
    await _serve(create_metrics_app(service), config, "metrics", shutdown_event, task_status)
