"""responses.py: the JSON objects and SSE chunks in OpenAI's shapes."""

from __future__ import annotations

import json
from typing import Any

from llm_local.core.types import Finished, FinishReason
from llm_local.transport.http.openai.errors import OpenAIError
from llm_local.transport.http.openai.responses import Completion, StreamEncoder

FINISHED = Finished(
    FinishReason.CONTEXT_FULL, prompt_tokens=10, completion_tokens=3, cached_tokens=6
)


def events(data: bytes) -> list[Any]:
    blocks = data.decode().split("\n\n")
    assert blocks[-1] == ""
    parsed = []
    for block in blocks[:-1]:
        assert block.startswith("data: ")
        value = block.removeprefix("data: ")
        parsed.append(value if value == "[DONE]" else json.loads(value))
    return parsed


def test_whole_chat_completion() -> None:
    completion = Completion(kind="chat", model="m", id="chatcmpl-1", created=5)

    assert completion.whole("Paris.", FINISHED) == {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 5,
        "model": "m",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Paris."},
                "logprobs": None,
                "finish_reason": "length",  # a full context is a length limit
            }
        ],
        "usage": {
            "prompt_tokens": 10,
            "completion_tokens": 3,
            "total_tokens": 13,
            "prompt_tokens_details": {"cached_tokens": 6},  # the prompt tokens reused
        },
    }


def test_chat_stream_role_deltas_finish_usage_done() -> None:
    encoder = StreamEncoder(Completion(kind="chat", model="m"), include_usage=True)
    data = encoder.opening() + encoder.text("Pa") + encoder.text("") + encoder.text("ris")
    data += encoder.finish(Finished(FinishReason.STOP, 10, 2))

    chunks = events(data)
    assert chunks[-1] == "[DONE]"
    assert [c["choices"][0]["delta"] for c in chunks[:4]] == [
        {"role": "assistant", "content": ""},
        {"content": "Pa"},
        {"content": "ris"},
        {},
    ]
    assert chunks[3]["choices"][0]["finish_reason"] == "stop"
    assert chunks[4]["choices"] == []
    assert chunks[4]["usage"]["total_tokens"] == 12
    assert {c["object"] for c in chunks[:-1]} == {"chat.completion.chunk"}
    assert len({c["id"] for c in chunks[:-1]}) == 1
    assert [c["usage"] for c in chunks[:4]] == [None] * 4


def test_completion_stream_has_no_role_and_no_usage_unless_asked() -> None:
    encoder = StreamEncoder(Completion(kind="completion", model="m"))
    data = encoder.opening() + encoder.text("é") + encoder.finish(FINISHED)

    chunks = events(data)
    assert [c["choices"][0]["text"] for c in chunks[:-1]] == ["é", ""]
    assert chunks[1]["choices"][0]["finish_reason"] == "length"
    assert all("usage" not in c for c in chunks[:-1])
    assert chunks[0]["id"].startswith("cmpl-")


def test_an_error_after_the_start_is_an_error_event_then_done() -> None:
    encoder = StreamEncoder(Completion(kind="chat", model="m"))
    error = OpenAIError(503, "server is shutting down", type="server_error")

    assert events(encoder.error(error)) == [
        {
            "error": {
                "message": "server is shutting down",
                "type": "server_error",
                "param": None,
                "code": None,
            }
        },
        "[DONE]",
    ]
