"""structured.py and the tool-call parts of responses.py: OpenAI's structured-output
fields to a constraint, and tool calls back out, whole and streamed, alike."""

from __future__ import annotations

import json
from typing import Any

import pytest

from llm_local.core.errors import InvalidRequest
from llm_local.core.structured import tools as fmt
from llm_local.core.structured.constraint import ToolMode
from llm_local.core.types import Finished, FinishReason
from llm_local.settings.schema import OpenAISettings
from llm_local.transport.http.openai.requests import parse_request
from llm_local.transport.http.openai.responses import Completion, StreamEncoder
from llm_local.transport.http.openai.structured import parse_structure

USER = {"role": "user", "content": "Weather in Paris?"}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
TIME = {"type": "function", "function": {"name": "get_time"}}
STOPPED = Finished(FinishReason.STOP, prompt_tokens=5, completion_tokens=9)
CALLS = (("get_weather", '{"city": "Paris"}'), ("get_time", "{}"))


def limits() -> OpenAISettings:
    return OpenAISettings(
        api_keys=(),
        model_id="",
        max_body_bytes=1 << 20,
        max_messages=16,
        max_prompt_chars=10_000,
    )


def test_json_schema_becomes_a_schema_constraint_naming_its_field() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    structure = parse_structure(
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}}
    )

    assert structure.constraint is not None and not structure.tool_calls
    assert structure.constraint.field == "response_format.json_schema.schema"
    assert json.loads(structure.constraint.schema or "") == schema


@pytest.mark.parametrize(
    ("body", "mode", "names", "parallel"),
    [
        ({"tools": [WEATHER, TIME]}, ToolMode.AUTO, ["get_weather", "get_time"], True),
        ({"tools": [WEATHER], "tool_choice": "required"}, ToolMode.REQUIRED, ["get_weather"], True),
        (
            {
                "tools": [WEATHER, TIME],
                "tool_choice": {"type": "function", "function": {"name": "get_time"}},
            },
            ToolMode.REQUIRED,
            ["get_time"],
            False,
        ),
        ({"tools": [WEATHER], "parallel_tool_calls": False}, ToolMode.AUTO, ["get_weather"], False),
    ],
)
def test_tool_choices(
    body: dict[str, Any], mode: ToolMode, names: list[str], parallel: bool
) -> None:
    structure = parse_structure(body)

    assert structure.constraint is not None
    assert structure.constraint.mode is mode
    assert [tool.name for tool in structure.constraint.tools] == names
    assert structure.constraint.parallel is parallel


def test_tool_choice_none_asks_for_nothing() -> None:
    assert parse_structure({"tools": [WEATHER], "tool_choice": "none"}).constraint is None


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice.function.name",
        ),
        ({"tools": [WEATHER, WEATHER]}, "tools[1].function.name"),
        ({"tools": [{"type": "retrieval"}]}, "tools[0].type"),
        ({"tools": [WEATHER], "response_format": {"type": "json_object"}}, "response_format"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": 3}}},
            "response_format.json_schema.schema",
        ),
        ({"response_format": {"type": "yaml"}}, "response_format.type"),
        ({"tools": [WEATHER], "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
    ],
)
def test_bad_structure_fields_are_refused_by_name(body: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_structure(body)
    assert caught.value.field == field


def test_tools_ride_on_the_request_and_history_renders_calls_and_results() -> None:
    arguments = json.dumps({"city": "Paris"})
    body = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            USER,
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "c1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": arguments},
                    },
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "Sunny"},
        ],
        "tools": [WEATHER],
    }
    parsed = parse_request("chat", body, limits())

    assert parsed.tool_calls
    assert parsed.raw.system_prompt == "Be brief."  # core/prompt.py adds the tools
    assert parsed.raw.constraint is not None
    assert [tool.name for tool in parsed.raw.constraint.tools] == ["get_weather"]
    assert parsed.raw.history[1] == ("assistant", fmt.call_text("get_weather", arguments))
    assert parsed.raw.user_prompt == fmt.tool_response_text("Sunny")


def test_whole_answer_with_calls_has_tool_calls_and_their_finish_reason() -> None:
    completion = Completion(kind="chat", model="m", tool_calls=True)

    choice = completion.whole(fmt.calls_text(CALLS), STOPPED)["choices"][0]

    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    calls = choice["message"]["tool_calls"]
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in calls] == list(CALLS)
    assert len({c["id"] for c in calls}) == 2


def test_whole_text_answer_in_auto_mode_is_content() -> None:
    completion = Completion(kind="chat", model="m", tool_calls=True)

    choice = completion.whole("Hello!", STOPPED)["choices"][0]

    assert choice["message"]["content"] == "Hello!"
    assert choice["finish_reason"] == "stop"


def test_streamed_calls_open_with_id_and_name_then_argument_deltas() -> None:
    encoder = StreamEncoder(Completion(kind="chat", model="m", tool_calls=True))
    text = fmt.calls_text(CALLS)
    data = b"".join(encoder.text(text[i : i + 5]) for i in range(0, len(text), 5))
    data += encoder.finish(STOPPED)

    chunks = [json.loads(block[6:]) for block in data.decode().split("\n\n") if block[6:7] == "{"]
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"][0]["delta"]]
    opened = [d["tool_calls"][0] for d in deltas if "id" in d["tool_calls"][0]]
    assert [(o["index"], o["function"]["name"]) for o in opened] == [
        (0, "get_weather"),
        (1, "get_time"),
    ]
    arguments = ["", ""]
    for delta in deltas:
        call = delta["tool_calls"][0]
        arguments[call["index"]] += call["function"]["arguments"]
    assert arguments == [a for _, a in CALLS]
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
