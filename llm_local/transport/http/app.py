"""The quart-trio app: health probes, effective config, Prometheus metrics.

Routes only translate: the answers come from health.py and config_view.py (pure), and
the metrics text from `service.metrics`. Every error leaves as JSON without a traceback.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from quart import Response, current_app, jsonify, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from llm_local.serving import Code
from llm_local.transport.http.config_view import config_body
from llm_local.transport.http.health import health, liveness, readiness
from llm_local.transport.http.openai.errors import OpenAIError, too_large
from llm_local.transport.http.openai.routes import RPC_BY_PATH, add_openai_routes, error_response

if TYPE_CHECKING:
    from llm_local.service import Service
    from llm_local.serving import GenerationFlow

log = logging.getLogger(__name__)


def _json(status: int, body: dict[str, Any]) -> Response:
    response = jsonify(body)
    response.status_code = status
    # Probes and dashboards must see the state now, never a cached one.
    response.headers["Cache-Control"] = "no-store"
    return response


def _http_error(error: HTTPException) -> Response:
    code = error.code or 500
    if request.path.startswith("/v1/"):
        limit = current_app.config.get("MAX_CONTENT_LENGTH")
        if code == 413 and isinstance(limit, int):
            return error_response(too_large(limit))  # werkzeug's text names no limit
        # OpenAI's clients read only their own error shape (413, unknown route, 405...).
        kind = "server_error" if code >= 500 else "invalid_request_error"
        return error_response(OpenAIError(code, error.description or error.name, type=kind))
    response = _json(code, {"error": error.name, "message": error.description, "status": code})
    if code == 405 and error.response is None:
        # Werkzeug knows the allowed methods; keep the Allow header RFC 9110 asks for.
        valid = getattr(error, "valid_methods", None)
        if valid:
            response.headers["Allow"] = ", ".join(sorted(valid))
    return response


def _internal_error(error: Exception) -> Response:
    # The traceback goes to the log, never to the client.
    log.error("unhandled error in an HTTP route", exc_info=error)
    return _json(
        500,
        {"error": "Internal Server Error", "message": "the server failed", "status": 500},
    )


HEADER_LIMIT_SETTING = "limits.http_max_header_bytes"


def _limit_headers(app: QuartTrio, limit: int, flow: GenerationFlow | None = None) -> None:
    """Refuse a request whose headers exceed `limit` bytes with 431, naming the setting;
    `flow` counts the refusal when it was a generation call (RESOURCE_EXHAUSTED, as the
    gRPC port counts oversized metadata).

    hypercorn bounds only a head that arrives in pieces (h11 counts what it buffers while
    the head is incomplete); a whole head read at once passes it up to its 64 KiB read.
    """

    async def check() -> Response | None:
        size = sum(len(name) + len(value) + 4 for name, value in request.headers.items())
        if size <= limit:
            return None
        message = (
            f"the request headers are {size} bytes; this server accepts at most {limit} "
            f"({HEADER_LIMIT_SETTING})"
        )
        rpc = RPC_BY_PATH.get(request.path)
        if flow is not None and rpc is not None and request.method == "POST":
            flow.refused(rpc, Code.RESOURCE_EXHAUSTED)
        if request.path.startswith("/v1/"):
            return error_response(OpenAIError(431, message, code="request_headers_too_large"))
        return _json(431, {"error": "Request Header Fields Too Large", "message": message,
                           "status": 431})  # fmt: skip

    app.before_request(check)


def metrics_response(service: Service) -> Response:
    body, content_type = service.metrics.render()
    return Response(body, status=200, content_type=content_type)


def _get(app: QuartTrio, rule: str, view: Callable[[], Awaitable[Response]]) -> None:
    app.add_url_rule(rule, view.__name__, view, methods=["GET"])


def create_app(service: Service, flow: GenerationFlow | None = None) -> QuartTrio:
    """Health, config and metrics; with `flow`, the OpenAI API on /v1/* as well."""
    app = QuartTrio(__name__)
    app.json.sort_keys = False
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(Exception, _internal_error)
    _limit_headers(app, service.settings.limits.http_max_header_bytes, flow)

    async def get_health() -> Response:
        return _json(*health(service))

    async def get_live() -> Response:
        return _json(*liveness(service))

    async def get_ready() -> Response:
        return _json(*readiness(service))

    async def get_config() -> Response:
        return _json(200, config_body(service))

    async def get_metrics() -> Response:
        return metrics_response(service)

    # add_url_rule rather than decorators: Quart's decorators are untyped for mypy.
    _get(app, "/health", get_health)
    _get(app, "/health/live", get_live)
    _get(app, "/health/ready", get_ready)
    _get(app, "/config", get_config)
    _get(app, "/metrics", get_metrics)
    if flow is not None:
        add_openai_routes(app, service, flow)
    return app


def create_metrics_app(service: Service) -> QuartTrio:
    """Only /metrics, for the separate metrics port."""
    app = QuartTrio(__name__)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(Exception, _internal_error)
    _limit_headers(app, service.settings.limits.http_max_header_bytes)

    async def get_metrics() -> Response:
        return metrics_response(service)

    _get(app, "/metrics", get_metrics)
    return app
