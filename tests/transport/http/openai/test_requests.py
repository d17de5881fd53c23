"""requests.py: OpenAI bodies -> RawRequest, and core's field names back to the body's."""

from __future__ import annotations

from typing import Any

import pytest

from llm_local.core.errors import InvalidRequest
from llm_local.core.validation import RawParams
from llm_local.settings.schema import OpenAISettings
from llm_local.transport.http.openai.requests import parse_request

LIMITS = OpenAISettings(
    api_keys=(), model_id=None, max_body_bytes=1 << 20, max_messages=4, max_prompt_chars=100
)


def chat(*messages: dict[str, Any], **fields: Any) -> Any:
    return parse_request("chat", {"messages": list(messages), **fields}, LIMITS)


def refusal(kind: str, body: dict[str, Any]) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as raised:
        parse_request(kind, body, LIMITS)  # type: ignore[arg-type]
    return raised.value


def user(content: Any) -> dict[str, Any]:
    return {"role": "user", "content": content}


def test_a_conversation_becomes_system_history_and_prompt() -> None:
    request = chat(
        {"role": "developer", "content": "Be brief."},
        user("Hi"),
        {"role": "assistant", "content": None},
        user([{"type": "text", "text": "What is"}, {"type": "text", "text": "2+2?"}]),
    )

    raw = request.raw
    assert raw.system_prompt == "Be brief."
    assert raw.history == (("user", "Hi"), ("assistant", ""))
    assert raw.user_prompt == "What is\n2+2?"
    assert raw.prompt_field == "messages[3].content"
    assert raw.chat_template


def test_parameters_map_to_core_and_unset_stays_unset() -> None:
    request = chat(
        user("Hi"),
        max_completion_tokens=7,
        temperature=0,
        top_p=0.5,
        stop="END",
        seed=3,
        top_k=4,
        stream=True,
        stream_options={"include_usage": True},
        user="tenant-a",
    )

    assert request.raw.params == RawParams(
        max_new_tokens=7, temperature=0.0, top_k=4, top_p=0.5, stop_sequences=("END",), seed=3
    )
    assert (request.stream, request.include_usage, request.user) == (True, True, "tenant-a")
    assert chat(user("Hi")).raw.params == RawParams()


def test_core_field_names_translate_to_the_body() -> None:
    names = chat(
        {"role": "system", "content": "s"},
        *[user(str(i)) for i in range(2)],
        max_completion_tokens=5,
        stop=["a", "b"],
    ).names
    assert names.translate("params.max_new_tokens") == "max_completion_tokens"
    assert names.translate("params.stop_sequences[1]") == "stop[1]"
    assert names.translate("history[0].role") == "messages[1].role"
    assert names.translate("system_prompt") == "messages[0].content"
    assert names.translate("params.top_p") == "top_p"
    single_stop = chat(user("x"), stop="a").names
    assert single_stop.translate("params.stop_sequences[0]") == "stop"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"messages": [user("x")], "n": 3}, "n"),
        ({"messages": [user("x")], "temperature": "hot"}, "temperature"),
        ({"messages": [user("x")], "max_tokens": True}, "max_tokens"),
        ({"messages": [user("x")], "max_tokens": 3, "max_completion_tokens": 4}, "max_tokens"),
        ({"messages": [user("x")], "stop": ["a", 1]}, "stop[1]"),
        ({"messages": [user("x")], "stream_options": {"include_usage": True}}, "stream_options"),
        (
            {"messages": [user("x")], "response_format": {"type": "json_schema"}},
            "response_format.json_schema",
        ),
        ({"messages": [user("x")], "tool_choice": "auto"}, "tool_choice"),
        ({"messages": [user("x")], "frequency_penalty": 1}, "frequency_penalty"),
        ({"messages": []}, "messages"),
        ({"messages": [user("x")] * 5}, "messages"),
        ({"messages": [user("x" * 101)]}, "messages"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": "x", "extra": 1}]}, "messages[0].extra"),
        ({"messages": [user([{"type": "image_url"}])]}, "messages[0].content[0].type"),
        ({"messages": [user("x"), {"role": "assistant", "content": "y"}]}, "messages[1].role"),
        ({"messages": [user("x")], "prompt": "p"}, "prompt"),
    ],
)
def test_chat_refusals_name_the_field(body: dict[str, Any], field: str) -> None:
    assert refusal("chat", body).field == field


def test_a_completion_takes_its_prompt_as_is() -> None:
    request = parse_request("completion", {"prompt": ["Once upon"], "max_tokens": 5}, LIMITS)

    assert request.raw.user_prompt == "Once upon"
    assert not request.raw.chat_template
    assert request.raw.prompt_field == "prompt"
    assert refusal("completion", {"prompt": [1, 2]}).field == "prompt"
    assert refusal("completion", {"prompt": "x", "echo": True}).field == "echo"
    assert refusal("completion", {"prompt": "x", "logprobs": 2}).field == "logprobs"
    assert refusal("completion", {"prompt": "x", "messages": []}).field == "messages"
