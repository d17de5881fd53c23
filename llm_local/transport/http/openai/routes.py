"""The /v1/* routes: a thin Quart adapter over `serving.GenerationFlow`.

Per request: the API key, the body (size, JSON), the mapping (requests.py), the model
name; then the flow does readiness, validation, prompt, admission and generation, and
this module writes its outcome as OpenAI JSON or as SSE (responses.py, errors.py).

A streamed generation runs in a task of the app's nursery and feeds the response body
through a memory channel; the response starts with the first text (or the end), so
that a refusal (400, 429, 503) is still an HTTP status. When the client disconnects,
Quart cancels the body, whose `finally` cancels the generation: decoding stops within
one step, as for a cancelled gRPC call. A client that stops reading fills the channel;
the flow then cancels the generation after ``server.stall_timeout_s`` (serving.py), and
should the client read again it finds an error event where the rest would have been.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

import trio
from quart import Response, jsonify, request
from quart_trio import QuartTrio
from werkzeug.exceptions import RequestEntityTooLarge

from llm_local.core.errors import InvalidRequest
from llm_local.core.types import Finished, FinishReason, TextChunk
from llm_local.core.validation import RawRequest
from llm_local.serving import CallError, CallMetadata, ClientGone, Code, GenerationFlow
from llm_local.transport.http.openai.auth import authorized
from llm_local.transport.http.openai.errors import (
    SERVER_ERROR,
    OpenAIError,
    from_call_error,
    model_not_found,
    unauthorized,
)
from llm_local.transport.http.openai.models import (
    accepted_names,
    adapter_model_id,
    model_id,
    model_list,
    model_object,
    requested_adapter,
)
from llm_local.transport.http.openai.requests import Kind, OpenAIRequest, parse_request
from llm_local.transport.http.openai.responses import Completion, StreamEncoder

if TYPE_CHECKING:
    from llm_local.service import Service

TENANT_ID_HEADER = "x-tenant-id"
TRACE_ID_HEADER = "x-trace-id"
SPAN_ID_HEADER = "x-span-id"
CALL_ID_HEADER = "x-call-id"  # docs/SCALING.md: a call's turns share it
# The service label of the request metrics and log lines (gRPC's are its service names).
RPC_NAMES: dict[Kind, str] = {"chat": "openai.chat.completions", "completion": "openai.completions"}
# The same labels by path, for what is refused before a route runs (headers too large).
RPC_BY_PATH: dict[str, str] = {
    "/v1/chat/completions": RPC_NAMES["chat"],
    "/v1/completions": RPC_NAMES["completion"],
}
# Chunks a slow client may fall behind before generation waits for it.
STREAM_BUFFER = 64

StreamItem = TextChunk | Finished | CallError
STALLED_MESSAGE = (
    "the stream was cancelled: the client stopped reading for longer than server.stall_timeout_s"
)


def error_response(error: OpenAIError) -> Response:
    response = jsonify(error.body())
    response.status_code = error.status
    response.headers.update(error.headers)
    return response


def add_openai_routes(app: QuartTrio, service: Service, flow: GenerationFlow) -> None:
    settings = service.settings
    limits = settings.openai
    identifier = model_id(settings.model.name, limits.model_id)
    names = accepted_names(settings.model.name, limits.model_id)
    created = int(time.time())  # the model's "created": when this server started
    adapters = tuple(adapter.id for adapter in settings.adapters)

    def served_adapters() -> tuple[str, ...]:
        """The adapters the loaded backend applies (none listed before it is ready, nor
        where the backend applies none: ct2 refuses them)."""
        info = service.state.model_info
        return () if info is None or info.adapters is None else info.adapters

    # Bigger bodies fail while they are read (413); only /v1/* takes bodies.
    app.config["MAX_CONTENT_LENGTH"] = limits.max_body_bytes

    def denied() -> Response | None:
        if authorized(request.headers.get("Authorization"), limits.api_keys):
            return None
        return error_response(unauthorized())

    async def list_models() -> Response:
        return denied() or jsonify(model_list(identifier, created, served_adapters()))

    async def get_model(model: str) -> Response:
        if refusal := denied():
            return refusal
        known, adapter = requested_adapter(model, names, adapters)
        if not known or (adapter is not None and adapter.lower() not in served_adapters()):
            return error_response(model_not_found(model))
        if adapter is None:
            return jsonify(model_object(identifier, created))
        found = adapter_model_id(identifier, adapter.lower())
        return jsonify(model_object(found, created, parent=identifier))

    async def generate(kind: Kind) -> Response:
        rpc = RPC_NAMES[kind]

        def refuse(code: Code, error: OpenAIError) -> Response:
            # Refused before the flow: counted here, as the flow counts what it refuses.
            flow.refused(rpc, code, _tenant_header())
            return error_response(error)

        if denied():
            return refuse(Code.UNAUTHENTICATED, unauthorized())
        try:
            body = json.loads(await request.get_data(as_text=False))
        except RequestEntityTooLarge:
            flow.refused(rpc, Code.RESOURCE_EXHAUSTED, _tenant_header())
            raise  # the app's error handler answers 413 naming the limit
        except ValueError as exc:
            invalid_json = OpenAIError(400, f"the request body is not valid JSON: {exc}")
            return refuse(Code.INVALID_ARGUMENT, invalid_json)
        if not isinstance(body, dict):
            not_object = OpenAIError(400, "the request body must be a JSON object")
            return refuse(Code.INVALID_ARGUMENT, not_object)
        try:
            parsed: OpenAIRequest | InvalidRequest = parse_request(kind, body, limits)
        except InvalidRequest as exc:
            parsed = exc
        if isinstance(parsed, OpenAIRequest):
            known, adapter = requested_adapter(parsed.model, names, adapters)
            if not known:
                return refuse(Code.NOT_FOUND, model_not_found(str(parsed.model)))
            if adapter is not None:  # core checks it: 404 unknown, 400 on ct2
                raw = dataclasses.replace(parsed.raw, adapter=adapter, adapter_field="model")
                parsed = dataclasses.replace(parsed, raw=raw)
        user = body.get("user")
        call = _call_metadata(user if isinstance(user, str) else None)
        tool_calls = isinstance(parsed, OpenAIRequest) and parsed.tool_calls
        completion = Completion(kind=kind, model=identifier, tool_calls=tool_calls)
        if isinstance(parsed, InvalidRequest):
            # Through the flow all the same, so that the refusal is logged and counted.
            return await _whole(flow, RPC_NAMES[kind], _raiser(parsed), call, completion, str)
        if parsed.stream:
            encoder = StreamEncoder(completion, include_usage=parsed.include_usage)
            return await _stream(app, flow, RPC_NAMES[kind], parsed, call, encoder)
        return await _whole(
            flow, RPC_NAMES[kind], parsed.raw, call, completion, parsed.names.translate
        )

    async def chat_completions() -> Response:
        return await generate("chat")

    async def completions() -> Response:
        return await generate("completion")

    # add_url_rule rather than decorators: Quart's decorators are untyped for mypy.
    app.add_url_rule("/v1/models", "openai_models", list_models, methods=["GET"])
    app.add_url_rule("/v1/models/<path:model>", "openai_model", get_model, methods=["GET"])
    app.add_url_rule("/v1/chat/completions", "openai_chat", chat_completions, methods=["POST"])
    app.add_url_rule("/v1/completions", "openai_completions", completions, methods=["POST"])


def _raiser(error: InvalidRequest) -> Callable[[], RawRequest]:
    def convert() -> RawRequest:
        raise error

    return convert


def _tenant_header() -> str | None:
    return (request.headers.get(TENANT_ID_HEADER) or "").strip() or None


def _call_metadata(user: str | None) -> CallMetadata:
    def header(name: str) -> str | None:
        return (request.headers.get(name) or "").strip() or None  # blank counts as absent

    remote = request.remote_addr
    return CallMetadata(
        tenant_id=header(TENANT_ID_HEADER) or (user or "").strip() or None,
        trace_id=header(TRACE_ID_HEADER),
        span_id=header(SPAN_ID_HEADER),
        call_id=header(CALL_ID_HEADER),
        peer=None if remote is None else str(remote),
    )


async def _whole(
    flow: GenerationFlow,
    rpc: str,
    raw: RawRequest | Callable[[], RawRequest],
    call: CallMetadata,
    completion: Completion,
    translate: Callable[[str], str],
) -> Response:
    parts: list[str] = []

    async def collect(chunk: TextChunk) -> None:
        parts.append(chunk.text)

    try:
        finished = await flow.generate(rpc, raw, call, collect, error_as_status=True)
    except CallError as error:
        return error_response(from_call_error(error, translate))
    return jsonify(completion.whole("".join(parts), finished))


async def _stream(
    app: QuartTrio,
    flow: GenerationFlow,
    rpc: str,
    parsed: OpenAIRequest,
    call: CallMetadata,
    encoder: StreamEncoder,
) -> Response:
    send, receive = trio.open_memory_channel[StreamItem](STREAM_BUFFER)
    scope = trio.CancelScope()

    async def on_text(chunk: TextChunk) -> None:
        try:
            await send.send(chunk)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise ClientGone("the response stream was closed") from exc

    async def produce() -> None:
        with scope, send:
            try:
                finished = await flow.generate(rpc, parsed.raw, call, on_text)
            except CallError as error:
                await send.send(error)
            except ClientGone:
                return
            else:
                await send.send(finished)

    app.nursery.start_soon(produce)
    try:
        first = await receive.receive()
    except BaseException:
        scope.cancel()  # the client left while the request waited for a slot or a token
        raise
    if isinstance(first, CallError):
        scope.cancel()
        return error_response(from_call_error(first, parsed.names.translate))
    events = _events(first, receive, scope, encoder, parsed.names.translate)
    response = Response(events, status=200, content_type="text/event-stream")
    response.headers["Cache-Control"] = "no-cache"
    response.headers["X-Accel-Buffering"] = "no"  # proxies must not hold events back
    response.timeout = None  # a stream lasts as long as the generation, not 60 s
    return response


async def _events(
    first: StreamItem,
    receive: trio.MemoryReceiveChannel[StreamItem],
    scope: trio.CancelScope,
    encoder: StreamEncoder,
    translate: Callable[[str], str],
) -> AsyncIterator[bytes]:
    try:
        if opening := encoder.opening():
            yield opening
        item = first
        while True:
            if isinstance(item, TextChunk):
                if data := encoder.text(item.text):
                    yield data
            elif isinstance(item, Finished):
                if item.reason is FinishReason.ERROR:
                    failed = OpenAIError(500, "generation failed", type="server_error")
                    yield encoder.error(failed)
                else:
                    yield encoder.finish(item)
                return
            else:
                yield encoder.error(from_call_error(item, translate))
                return
            try:
                item = await receive.receive()
            except trio.EndOfChannel:
                # The generation ended without a last item: it stopped because this
                # client stopped reading (a client that left never reads this).
                yield encoder.error(OpenAIError(408, STALLED_MESSAGE, type=SERVER_ERROR))
                return
    finally:
        # Also when Quart cancels or closes the body because the client went away.
        scope.cancel()
        receive.close()
