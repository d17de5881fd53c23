"""The JSON objects and SSE chunks of OpenAI's responses, pure.

Non-streamed: one ``chat.completion`` (or ``text_completion``) with ``usage``.
Streamed (``text/event-stream``), for a chat: a chunk with the assistant role, one
chunk per text delta, a chunk with the finish reason, the usage chunk (empty
``choices``) when ``stream_options.include_usage`` asked for it, then
``data: [DONE]``. A completion streams the same way without the role chunk.

A chat that offered tools reads the model's answer with core/structured/tools.py: calls
become ``message.tool_calls`` (ids, names, arguments as JSON text) and the finish reason
``tool_calls``; streamed, a call opens with a delta carrying its id and name, then deltas
of ``function.arguments``, as OpenAI streams them.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from llm_local.core.structured import tools as fmt
from llm_local.core.types import Finished, FinishReason
from llm_local.transport.http.openai.errors import OpenAIError
from llm_local.transport.http.openai.requests import Kind

# OpenAI knows "stop" and "length": a full context is a length limit too, and a
# generation cut short by a stopping server ended as far as the client can tell.
FINISH_REASONS: dict[FinishReason, str] = {
    FinishReason.STOP: "stop",
    FinishReason.LENGTH: "length",
    FinishReason.CONTEXT_FULL: "length",
    FinishReason.CANCELLED: "stop",
    FinishReason.ERROR: "stop",
}
DONE = b"data: [DONE]\n\n"
_OBJECTS: dict[Kind, tuple[str, str]] = {
    "chat": ("chat.completion", "chat.completion.chunk"),
    "completion": ("text_completion", "text_completion"),
}
_ID_PREFIXES: dict[Kind, str] = {"chat": "chatcmpl-", "completion": "cmpl-"}


def usage(finished: Finished) -> dict[str, Any]:
    return {
        "prompt_tokens": finished.prompt_tokens,
        "completion_tokens": finished.completion_tokens,
        "total_tokens": finished.prompt_tokens + finished.completion_tokens,
        # OpenAI's field for prompt tokens served from its prompt cache: here, those whose
        # state the backend had kept (0 where it keeps none).
        "prompt_tokens_details": {"cached_tokens": finished.cached_tokens},
    }


def sse_event(data: dict[str, Any]) -> bytes:
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return b"data: " + text.encode() + b"\n\n"


@dataclass(frozen=True, slots=True)
class Completion:
    """What every object of one response shares."""

    kind: Kind
    model: str
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))
    tool_calls: bool = False  # the answer is read as tool calls (or text)

    def __post_init__(self) -> None:
        if not self.id:
            object.__setattr__(self, "id", _ID_PREFIXES[self.kind] + uuid.uuid4().hex)

    def _head(self, streamed: bool) -> dict[str, Any]:
        whole, chunk = _OBJECTS[self.kind]
        return {
            "id": self.id,
            "object": chunk if streamed else whole,
            "created": self.created,
            "model": self.model,
        }

    def _choice(
        self, text: str | None, finish_reason: str | None, streamed: bool
    ) -> dict[str, Any]:
        if self.kind == "completion":
            body: dict[str, Any] = {"index": 0, "text": text or ""}
        elif streamed:
            body = {"index": 0, "delta": {} if text is None else {"content": text}}
        else:
            body = {"index": 0, "message": {"role": "assistant", "content": text or ""}}
        body.update(logprobs=None, finish_reason=finish_reason)
        return body

    def whole(self, text: str, finished: Finished) -> dict[str, Any]:
        """The non-streamed response."""
        reason = FINISH_REASONS[finished.reason]
        answer = fmt.read_answer(text) if self.tool_calls else None
        if answer is None or not answer.calls:
            choice = self._choice(text, reason, streamed=False)
        else:
            calls = [
                {"id": new_call_id(), "type": "function", "function": {"name": n, "arguments": a}}
                for n, a in answer.calls
            ]
            message = {"role": "assistant", "content": None, "tool_calls": calls}
            choice = {"index": 0, "message": message, "logprobs": None}
            choice["finish_reason"] = _calls_finish_reason(reason)
        return {**self._head(streamed=False), "choices": [choice], "usage": usage(finished)}


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def _calls_finish_reason(reason: str) -> str:
    return "tool_calls" if reason == "stop" else reason


@dataclass(frozen=True, slots=True)
class StreamEncoder:
    """The SSE bytes of one streamed response, event by event."""

    completion: Completion
    include_usage: bool = False
    reader: fmt.ToolCallReader | None = None  # set when the answer may be tool calls

    def __post_init__(self) -> None:
        if self.completion.tool_calls and self.reader is None:
            object.__setattr__(self, "reader", fmt.ToolCallReader())

    def _chunk(self, choices: list[dict[str, Any]], **extra: Any) -> bytes:
        body = {**self.completion._head(streamed=True), "choices": choices}
        if self.include_usage:
            body["usage"] = None  # every chunk but the last carries "usage": null
        body.update(extra)
        return sse_event(body)

    def opening(self) -> bytes:
        """A chat stream starts with the assistant's role; a completion with nothing."""
        if self.completion.kind != "chat":
            return b""
        choice = {"index": 0, "delta": {"role": "assistant", "content": ""}}
        choice.update(logprobs=None, finish_reason=None)
        return self._chunk([choice])

    def text(self, text: str) -> bytes:
        if not text:
            return b""
        if self.reader is not None:
            return self._parts(self.reader.feed(text))
        return self._chunk([self.completion._choice(text, None, streamed=True)])

    def _parts(self, parts: Iterable[fmt.StreamPart]) -> bytes:
        events: list[bytes] = []
        for part in parts:
            if isinstance(part, fmt.Text):
                events.append(self._chunk([self.completion._choice(part.text, None, True)]))
                continue
            if isinstance(part, fmt.CallStarted):
                call: dict[str, Any] = {
                    "index": part.index,
                    "id": new_call_id(),
                    "type": "function",
                    "function": {"name": part.name, "arguments": ""},
                }
            else:
                call = {"index": part.index, "function": {"arguments": part.delta}}
            choice = {"index": 0, "delta": {"tool_calls": [call]}}
            choice.update(logprobs=None, finish_reason=None)
            events.append(self._chunk([choice]))
        return b"".join(events)

    def finish(self, finished: Finished) -> bytes:
        reason = FINISH_REASONS[finished.reason]
        events: list[bytes] = []
        if self.reader is not None:
            events.append(self._parts(self.reader.finish()))
            if self.reader.calls:
                reason = _calls_finish_reason(reason)
        events.append(self._chunk([self.completion._choice(None, reason, streamed=True)]))
        if self.include_usage:
            events.append(self._chunk([], usage=usage(finished)))
        events.append(DONE)
        return b"".join(events)

    def error(self, error: OpenAIError) -> bytes:
        """A failure after the stream started: an error event, then the end."""
        return sse_event(error.body()) + DONE
