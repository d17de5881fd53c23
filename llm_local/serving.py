"""The request flow every generation RPC shares, whatever the transport.

readiness -> validation -> prompt -> admission -> generation, then one log line and the
metrics of the request. Each failure becomes a `CallError` whose `Code` names the gRPC
status the transport sends:

=================================  ====================  ==============================
what happened                      code                  message
=================================  ====================  ==============================
tenant id required but missing     INVALID_ARGUMENT      x-tenant-id metadata is required
model loading / failed / stopping  UNAVAILABLE           what the state says
a field is wrong                   INVALID_ARGUMENT      ``<field>: <why>``
prompt too long for the context    INVALID_ARGUMENT      ``<prompt field>: ...``
an unknown LoRA adapter            NOT_FOUND             ``<adapter field>: no LoRA ...``
no slot and no queue place         RESOURCE_EXHAUSTED    server at capacity ...
the tenant holds its limit         RESOURCE_EXHAUSTED    tenant '...' at its limit ...
the client's deadline passed       DEADLINE_EXCEEDED     generation stopped
server stopping, grace period over UNAVAILABLE           server is shutting down
a bug                              INTERNAL              generic, with the request id
=================================  ====================  ==============================

When the transport cancels the call (client went away) the trio scope is cancelled,
generation stops, and `trio.Cancelled` propagates after the request is logged.

A client that stops reading makes the transport's send wait (the HTTP/2 flow-control
window or the socket buffer is full; the HTTP stream's bounded channel is full). Once
one chunk has waited ``server.stall_timeout_s`` the generation is cancelled, its slot
freed, a warning logged and `ClientStalled` raised: a stalled reader holds neither a
slot nor more than one chunk (plus the transport's bounded buffers) for long.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import math
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from llm_local.core.adapters import UnknownAdapter, check_adapter
from llm_local.core.errors import CapacityExceeded, InvalidRequest, NotReady
from llm_local.core.generation import run_generation
from llm_local.core.prompt import prepare_prompt
from llm_local.core.types import Finished, FinishReason, RequestContext, TextChunk
from llm_local.core.validation import RawRequest, validate_request_off_loop
from llm_local.observability.logging import request_logger

if TYPE_CHECKING:
    from llm_local.service import Service

TextSink = Callable[[TextChunk], Awaitable[None]]

TENANT_REQUIRED_MESSAGE = "x-tenant-id metadata is required"
SHUTTING_DOWN_MESSAGE = "server is shutting down"


class Code(enum.Enum):
    """Outcomes of a call, named and numbered as gRPC status codes."""

    OK = 0
    CANCELLED = 1
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    RESOURCE_EXHAUSTED = 8
    UNIMPLEMENTED = 12
    UNAVAILABLE = 14
    INTERNAL = 13
    UNAUTHENTICATED = 16


class CallError(Exception):
    """The call ends with `code` and `message` (shown to the client as is).

    For INVALID_ARGUMENT, `field` names the wrong field (core's name, e.g.
    ``params.top_p``) and the message is ``<field>: <reason>``.
    """

    def __init__(self, code: Code, message: str, field: str | None = None) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message
        self.field = field

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"


class ClientGone(Exception):
    """Sending failed because the client closed the call or the connection."""


class ClientStalled(ClientGone):
    """The client took no text for ``server.stall_timeout_s``: it stopped reading."""


@dataclass(frozen=True, slots=True)
class CallMetadata:
    """What the transport knows about a call besides its request message."""

    tenant_id: str | None = None
    trace_id: str | None = None
    span_id: str | None = None
    call_id: str | None = None  # x-call-id: one conversation's turns share it
    time_remaining_s: float | None = None  # until the client's deadline; None = none
    peer: str | None = None


def prompt_fields(raw: RawRequest) -> dict[str, object]:
    """A request's text, as log fields (for logging.log_prompts)."""
    return {
        "system_prompt": raw.system_prompt,
        "history": [list(turn) for turn in raw.history],
        "rag_context": raw.rag_context,
        raw.prompt_field: raw.user_prompt,
    }


def new_request_id() -> str:
    return uuid.uuid4().hex[:16]


@dataclass(slots=True)
class _Record:
    """What the end-of-request log line and metrics report."""

    started: float
    code: Code = Code.OK
    message: str = ""
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0  # of prompt_tokens, the ones whose state the backend kept
    completion_tokens: int = 0
    first_text_at: float | None = None
    last_text_at: float | None = None
    adapter: str | None = None  # the validated LoRA adapter, "" for none (metrics label)


class GenerationFlow:
    """Runs generation calls for the transports and tracks them for a graceful stop."""

    def __init__(self, service: Service) -> None:
        self._service = service
        self._calls: set[trio.CancelScope] = set()
        self._call_ended = trio.Event()
        # The drain's wait for running calls; cancelled early by `end_grace_period`.
        self._grace = trio.CancelScope()
        self._log = logging.getLogger("llm_local.request")

    @property
    def in_flight(self) -> int:
        """Generation calls started and not yet ended."""
        return len(self._calls)

    def refused(self, rpc: str | None, code: Code, tenant: str | None = None) -> None:
        """Count a call the transport refused before it reached `generate` (too large,
        undecodable, ...), under the service label `rpc` it would have had (None: the
        transport cannot tell). The transport has logged why; nothing else is recorded."""
        self._service.metrics.observe_refusal(service=rpc, code=code.name, tenant=tenant)

    async def generate(
        self,
        rpc: str,
        request: RawRequest | Callable[[], RawRequest],
        call: CallMetadata,
        on_text: TextSink,
        *,
        error_as_status: bool = False,
    ) -> Finished:
        """Serve one call; `on_text` sends each text chunk as it is generated.

        `request` may be a function that converts the wire message and raises
        InvalidRequest for what it cannot accept; it runs inside the flow so that such
        a rejection is logged and counted like any other. `rpc` names the service in
        logs and metrics. With `error_as_status`, a generation that fails midway raises
        CallError(INTERNAL) instead of returning Finished(reason=ERROR) (for a wire
        format that has no finish message).
        """
        context = RequestContext(
            request_id=new_request_id(),
            tenant_id=call.tenant_id,
            trace_id=call.trace_id,
            span_id=call.span_id,
            call_id=call.call_id,
        )
        log = request_logger(context, self._log)
        record = _Record(started=time.perf_counter())
        log.debug("request received", extra={"rpc": rpc, "peer": call.peer})
        deadline = math.inf if call.time_remaining_s is None else call.time_remaining_s
        shutdown_scope = trio.CancelScope()
        self._calls.add(shutdown_scope)
        try:
            with shutdown_scope:
                with trio.move_on_after(deadline):
                    finished = await self._serve(request, context, record, on_text, log)
                    if error_as_status and finished.reason is FinishReason.ERROR:
                        raise CallError(
                            Code.INTERNAL, f"generation failed (request id {context.request_id})"
                        )
                    return finished
                raise CallError(Code.DEADLINE_EXCEEDED, "deadline exceeded; generation stopped")
            raise CallError(Code.UNAVAILABLE, SHUTTING_DOWN_MESSAGE)
        except CallError as error:
            record.code, record.message = error.code, error.message
            if error.code is Code.RESOURCE_EXHAUSTED:
                self._service.metrics.rejected(rpc)
            raise
        except ClientStalled as stalled:
            record.code, record.message = Code.CANCELLED, str(stalled)
            self._service.metrics.stalled(rpc)
            log.warning("%s: stream cancelled, slot freed", stalled, extra={"rpc": rpc})
            raise
        except ClientGone as gone:
            record.code, record.message = Code.CANCELLED, f"client went away: {gone}"
            raise
        except Exception:
            log.exception("request failed with an unexpected error", extra={"rpc": rpc})
            record.code = Code.INTERNAL
            record.message = f"internal error (request id {context.request_id})"
            raise CallError(Code.INTERNAL, record.message) from None
        except BaseException:
            # trio.Cancelled (alone, or grouped by a nursery inside the backend): the
            # transport cancelled us because the client cancelled, disconnected, or its
            # deadline passed first on the transport's own clock.
            passed = call.time_remaining_s is not None and (
                time.perf_counter() - record.started >= call.time_remaining_s
            )
            record.code = Code.DEADLINE_EXCEEDED if passed else Code.CANCELLED
            record.message = "call cancelled by the transport"
            raise
        finally:
            self._calls.discard(shutdown_scope)
            self._call_ended.set()
            self._call_ended = trio.Event()
            self._report(rpc, record, log, context.tenant_id)

    async def _serve(
        self,
        request: RawRequest | Callable[[], RawRequest],
        context: RequestContext,
        record: _Record,
        on_text: TextSink,
        log: logging.LoggerAdapter[logging.Logger],
    ) -> Finished:
        service = self._service
        if service.settings.server.require_tenant_id and not context.tenant_id:
            raise CallError(Code.INVALID_ARGUMENT, TENANT_REQUIRED_MESSAGE)
        try:
            info = service.state.check_ready()
            raw = request if isinstance(request, RawRequest) else request()
            if service.settings.logging.log_prompts:
                # Only when switched on (logging.log_prompts): prompts are user data.
                log.debug("prompt", extra=prompt_fields(raw))
            valid = await validate_request_off_loop(
                raw, service.settings.generation, context, info.sampling
            )
            adapter = check_adapter(raw.adapter, raw.adapter_field, info.adapters, info.backend)
            if adapter is not None:
                valid = dataclasses.replace(valid, adapter=adapter)
            record.adapter = adapter or ""
            prepared = prepare_prompt(valid, service.backend.tokenizer, info.context_limit)
        except NotReady as exc:
            raise CallError(Code.UNAVAILABLE, str(exc)) from None
        except InvalidRequest as exc:
            raise CallError(Code.INVALID_ARGUMENT, str(exc), field=exc.field) from None
        except UnknownAdapter as exc:
            raise CallError(Code.NOT_FOUND, str(exc), field=exc.field) from None

        metrics = service.metrics
        stall_timeout_s = service.settings.server.stall_timeout_s

        async def counted(chunk: TextChunk) -> None:
            now = time.perf_counter()
            if record.last_text_at is None:
                record.first_text_at = now
            elif chunk.token_count > 0:
                # Tokens of one chunk arrived together: spread the gap over them.
                gap = (now - record.last_text_at) / chunk.token_count
                for _ in range(chunk.token_count):
                    metrics.observe_inter_token(gap)
            record.last_text_at = now
            record.completion_tokens += chunk.token_count
            with trio.move_on_after(stall_timeout_s) as waiting:
                await on_text(chunk)
            if waiting.cancelled_caught:
                raise ClientStalled(
                    f"client stopped reading: a chunk waited {stall_timeout_s:g} s to be "
                    "sent (server.stall_timeout_s)"
                )

        try:
            async with service.admission.slot(context.tenant_id):
                record.prompt_tokens = len(prepared.ids)  # counted once admitted
                finished = await run_generation(service.backend, valid, prepared, counted)
        except CapacityExceeded as exc:
            raise CallError(Code.RESOURCE_EXHAUSTED, str(exc)) from None
        record.finish_reason = finished.reason
        record.prompt_tokens = finished.prompt_tokens
        record.cached_tokens = finished.cached_tokens
        record.completion_tokens = finished.completion_tokens
        if finished.reason is FinishReason.ERROR:
            log.error("generation failed in the backend: %s", finished.error)
        return finished

    def _report(
        self,
        rpc: str,
        record: _Record,
        log: logging.LoggerAdapter[logging.Logger],
        tenant: str | None,
    ) -> None:
        ended = time.perf_counter()
        duration = ended - record.started
        ttft = None if record.first_text_at is None else record.first_text_at - record.started
        self._service.metrics.observe_request(
            service=rpc,
            code=record.code.name,
            prompt_tokens=record.prompt_tokens,
            completion_tokens=record.completion_tokens,
            cached_tokens=record.cached_tokens,
            ttft_s=ttft,
            duration_s=duration,
            tenant=tenant,
            adapter=record.adapter,
        )
        fields: dict[str, object] = {
            "rpc": rpc,
            "status": record.code.name,
            "finish_reason": None if record.finish_reason is None else str(record.finish_reason),
            "prompt_tokens": record.prompt_tokens,
            "cached_prompt_tokens": record.cached_tokens,
            "completion_tokens": record.completion_tokens,
            "ttft_ms": None if ttft is None else round(ttft * 1000, 1),
            "duration_ms": round(duration * 1000, 1),
        }
        if record.message:
            fields["detail"] = record.message
        level = logging.ERROR if record.code is Code.INTERNAL else logging.INFO
        log.log(level, "request finished", extra=fields)

    async def drain(self, grace_period_s: float) -> int:
        """Let running calls finish for up to `grace_period_s`, then cancel the rest.

        Cancelled calls end with UNAVAILABLE ("server is shutting down"). Returns how
        many calls had to be cancelled. New calls are refused by the service state
        (stopping), not here.
        """
        if not self._grace.cancel_called:
            self._grace.deadline = trio.current_time() + grace_period_s
        with self._grace:
            await self._wait_until_idle()
        leftover = len(self._calls)
        for scope in list(self._calls):
            scope.cancel()
        await self._wait_until_idle()
        return leftover

    def end_grace_period(self) -> None:
        """Cancel the running calls now rather than after the grace period (a second
        stop signal); works before `drain` starts as well as during it."""
        self._grace.cancel()

    async def _wait_until_idle(self) -> None:
        while self._calls:
            await self._call_ended.wait()
