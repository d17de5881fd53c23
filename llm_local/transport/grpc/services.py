"""The two generation services of ``sentiric.llm.v1``, as thin adapters over serving.py.

- LlamaService.GenerateStream: UTF-8 bytes per text chunk, then exactly one
  ``finish_details``, then OK.
- LLMLocalService.LocalGenerateStream: readable text per chunk (whole characters), the
  prompt as a single user turn; a generation that fails midway ends with INTERNAL.

Each chunk is a group of tokens (whatever the backend delivered at one wake-up), sent
with one crossing into asyncio.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from grpclib.const import Status
from grpclib.exceptions import GRPCError
from grpclib.server import Stream

from llm_local.core.types import TextChunk
from llm_local.proto.sentiric.llm.v1 import llama_pb2, local_pb2
from llm_local.proto.sentiric.llm.v1.llama_grpc import LlamaServiceBase
from llm_local.proto.sentiric.llm.v1.local_grpc import LLMLocalServiceBase
from llm_local.serving import CallError, CallMetadata, ClientGone, Code, GenerationFlow
from llm_local.transport.grpc import messages
from llm_local.transport.grpc.bridge import (
    MESSAGE_LIMIT_SETTING,
    NO_LIMITS,
    CallLimits,
    HandlerTracker,
    MessageTooLarge,
    TrioStream,
    UndecodableMessage,
    trio_handler,
)

log = logging.getLogger(__name__)

LLAMA_SERVICE = "sentiric.llm.v1.LlamaService"
LOCAL_SERVICE = "sentiric.llm.v1.LLMLocalService"
TENANT_ID_KEY = "x-tenant-id"
TRACE_ID_KEY = "x-trace-id"
SPAN_ID_KEY = "x-span-id"
CALL_ID_KEY = "x-call-id"  # docs/SCALING.md: a call's turns share it


def call_metadata(stream: TrioStream) -> CallMetadata:
    def value(key: str) -> str | None:
        text = (stream.metadata_value(key) or "").strip()
        return text or None  # blank counts as absent

    return CallMetadata(
        tenant_id=value(TENANT_ID_KEY),
        trace_id=value(TRACE_ID_KEY),
        span_id=value(SPAN_ID_KEY),
        call_id=value(CALL_ID_KEY),
        time_remaining_s=stream.time_remaining(),
        peer=stream.peer_address,
    )


@asynccontextmanager
async def grpc_status(
    request_type: Any, refused: Callable[[Code], None] = lambda code: None
) -> AsyncIterator[None]:
    """Turn the flow's outcomes (and what the transport refuses before the flow runs)
    into the gRPC status grpclib sends. The flow counts its own outcomes; `refused` is
    told of the transport's refusals, which the flow never sees."""
    try:
        yield
    except CallError as error:
        raise GRPCError(Status(error.code.value), error.message) from None
    except ClientGone as gone:
        # Nobody is listening any more; this only keeps grpclib's log quiet.
        raise GRPCError(Status.CANCELLED, f"client went away: {gone}") from None
    except UndecodableMessage as undecodable:
        invalid = messages.undecodable_request(
            request_type.DESCRIPTOR, undecodable.wire, undecodable.reason
        )
        # Refused before the flow sees a request: this line is all the log says of it.
        log.info("refused an undecodable request message: %s", invalid)
        refused(Code.INVALID_ARGUMENT)
        raise GRPCError(Status.INVALID_ARGUMENT, str(invalid)) from None
    except MessageTooLarge as large:
        log.warning(
            "refused a request message of %d bytes (%s = %d)",
            large.size,
            MESSAGE_LIMIT_SETTING,
            large.limit,
        )
        refused(Code.RESOURCE_EXHAUSTED)
        raise GRPCError(
            Status.RESOURCE_EXHAUSTED,
            f"the request message is {large.size} bytes; this server accepts at most "
            f"{large.limit} ({MESSAGE_LIMIT_SETTING})",
        ) from None


class _TrioService:
    """A generation service whose one RPC runs `_generate_stream` as a trio task."""

    rpc = ""  # the service label of its log lines and metrics

    def __init__(
        self,
        flow: GenerationFlow,
        tracker: HandlerTracker | None = None,
        limits: CallLimits = NO_LIMITS,
    ) -> None:
        self._flow = flow
        self._handler = trio_handler(
            self._generate_stream,
            tracker,
            limits,
            # Oversized metadata: refused before the body, whose tenant id is unread.
            on_refusal=lambda status: flow.refused(self.rpc, Code(status.value)),
        )

    def _refused(self, stream: TrioStream) -> Callable[[Code], None]:
        def count(code: Code) -> None:
            self._flow.refused(self.rpc, code, call_metadata(stream).tenant_id)

        return count

    async def _generate_stream(self, stream: TrioStream) -> None:
        raise NotImplementedError


class LlamaService(_TrioService, LlamaServiceBase):  # type: ignore[misc]
    rpc = "LlamaService"

    async def GenerateStream(self, stream: Stream[Any, Any]) -> None:
        await self._handler(stream)

    async def _generate_stream(self, stream: TrioStream) -> None:
        async with grpc_status(llama_pb2.GenerateStreamRequest, self._refused(stream)):
            message = await stream.recv_message()

            async def send(chunk: TextChunk) -> None:
                await stream.send_message(messages.llama_token(chunk.text))

            finished = await self._flow.generate(
                self.rpc,
                lambda: messages.llama_raw_request(message),
                call_metadata(stream),
                send,
            )
            await stream.send_message(messages.llama_finish(finished))


class LLMLocalService(_TrioService, LLMLocalServiceBase):  # type: ignore[misc]
    rpc = "LLMLocalService"

    async def LocalGenerateStream(self, stream: Stream[Any, Any]) -> None:
        await self._handler(stream)

    async def _generate_stream(self, stream: TrioStream) -> None:
        async with grpc_status(local_pb2.LocalGenerateStreamRequest, self._refused(stream)):
            message = await stream.recv_message()

            async def send(chunk: TextChunk) -> None:
                await stream.send_message(messages.local_token(chunk.text))

            await self._flow.generate(
                self.rpc,
                messages.local_raw_request(message),
                call_metadata(stream),
                send,
                error_as_status=True,
            )
