"""serve_http / serve_metrics: real hypercorn sockets inside a trio nursery."""

from __future__ import annotations

import dataclasses
import json
import socket
import urllib.error
import urllib.request
from collections.abc import Callable
from functools import partial

import trio

from llm_local.service import Service
from llm_local.transport.http.server import serve_http, serve_metrics


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def with_ports(service: Service, http_port: int, metrics_port: int) -> Service:
    server = dataclasses.replace(
        service.settings.server, http_port=http_port, metrics_port=metrics_port
    )
    settings = dataclasses.replace(service.settings, server=server)
    return dataclasses.replace(service, settings=settings)


async def fetch(url: str) -> tuple[int, bytes]:
    def blocking() -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()

    return await trio.to_thread.run_sync(blocking)


async def test_serves_health_until_the_shutdown_event(
    make_service: Callable[..., Service],
) -> None:
    http_port, metrics_port = free_port(), free_port()
    service = with_ports(make_service(), http_port, metrics_port)
    shutdown = trio.Event()
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(serve_http, service, shutdown_event=shutdown))
            await nursery.start(partial(serve_metrics, service, shutdown_event=shutdown))

            code, body = await fetch(f"http://127.0.0.1:{http_port}/health")
            assert code == 503
            assert json.loads(body)["status"] == "loading"

            code, body = await fetch(f"http://127.0.0.1:{metrics_port}/metrics")
            assert code == 200
            assert b'llm_local_model_state{state="loading"} 1.0' in body
            code, _ = await fetch(f"http://127.0.0.1:{metrics_port}/health")
            assert code == 404  # the metrics port serves only /metrics

            shutdown.set()
        # Leaving the nursery means both servers returned after the event.


async def test_metrics_port_zero_serves_nothing_extra(
    make_service: Callable[..., Service],
) -> None:
    service = with_ports(make_service(), free_port(), 0)
    with trio.fail_after(5):
        # Returns on its own: nothing to serve, and the shutdown event is never set.
        await serve_metrics(service, shutdown_event=trio.Event())
