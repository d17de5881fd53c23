"""Wire messages <-> core types (no server)."""

from __future__ import annotations

import json

import pytest

from llm_local.core.errors import InvalidRequest
from llm_local.core.types import Finished, FinishReason
from llm_local.core.validation import RawParams
from llm_local.proto.sentiric.llm.v1 import llama_pb2, local_pb2
from llm_local.transport.grpc import messages


def test_unset_params_are_none_and_zeros_are_kept() -> None:
    unset = llama_pb2.GenerateStreamRequest(user_prompt="Hi")
    zeros = llama_pb2.GenerateStreamRequest(
        user_prompt="Hi",
        params=llama_pb2.GenerationParams(
            max_new_tokens=0, temperature=0.0, top_k=0, top_p=0.0, repetition_penalty=0.0, seed=0
        ),
    )

    assert messages.llama_raw_request(unset).params == RawParams()
    assert messages.llama_raw_request(zeros).params == RawParams(
        max_new_tokens=0, temperature=0.0, top_k=0, top_p=0.0, repetition_penalty=0.0, seed=0
    )


def test_float32_values_read_back_as_written() -> None:
    message = llama_pb2.GenerateStreamRequest(
        params=llama_pb2.GenerationParams(temperature=0.7, top_p=0.95, repetition_penalty=1.1)
    )

    params = messages.llama_raw_request(message).params

    assert (params.temperature, params.top_p, params.repetition_penalty) == (0.7, 0.95, 1.1)


def test_request_fields_are_carried_over() -> None:
    message = llama_pb2.GenerateStreamRequest(
        system_prompt="sys",
        user_prompt="q",
        rag_context="ctx",
        history=[llama_pb2.ConversationTurn(role="user", content="a")],
        params=llama_pb2.GenerationParams(stop_sequences=["\n\n", "END"], seed=7),
    )

    raw = messages.llama_raw_request(message)

    assert (raw.system_prompt, raw.user_prompt, raw.rag_context) == ("sys", "q", "ctx")
    assert raw.history == (("user", "a"),)
    assert raw.params.stop_sequences == ("\n\n", "END")
    assert raw.params.seed == 7
    assert raw.prompt_field == "user_prompt"


def test_unset_rag_context_is_none_but_an_empty_lora_id_is_accepted() -> None:
    message = llama_pb2.GenerateStreamRequest(user_prompt="q", lora_adapter_id="")

    assert messages.llama_raw_request(message).rag_context is None


def test_a_lora_adapter_id_travels_to_core_under_its_wire_name() -> None:
    message = llama_pb2.GenerateStreamRequest(user_prompt="q", lora_adapter_id="support-v2")

    raw = messages.llama_raw_request(message)

    assert (raw.adapter, raw.adapter_field) == ("support-v2", "lora_adapter_id")


def test_an_empty_lora_adapter_id_means_the_base_model() -> None:
    message = llama_pb2.GenerateStreamRequest(user_prompt="q", lora_adapter_id="")

    assert messages.llama_raw_request(message).adapter is None


def test_local_prompt_is_the_user_turn_under_its_own_name() -> None:
    raw = messages.local_raw_request(local_pb2.LocalGenerateStreamRequest(prompt="Hello"))

    assert (raw.user_prompt, raw.prompt_field, raw.history) == ("Hello", "prompt", ())


def test_responses() -> None:
    finished = Finished(FinishReason.CONTEXT_FULL, prompt_tokens=10, completion_tokens=5)

    assert messages.llama_token("é").token == "é".encode()
    details = messages.llama_finish(finished).finish_details
    assert (details.finish_reason, details.prompt_tokens, details.completion_tokens) == (
        "context_full",
        10,
        5,
    )
    assert messages.local_token("é").token == "é"


def test_a_string_that_is_not_utf8_is_named_by_its_path() -> None:
    descriptor = llama_pb2.GenerateStreamRequest.DESCRIPTOR
    good = llama_pb2.GenerateStreamRequest(
        user_prompt="Hi", history=[llama_pb2.ConversationTurn(role="user", content="ok")] * 2
    ).SerializeToString()
    # history (field 4) once more: role "user", content (field 2) bytes that are not UTF-8.
    bad_turn = b"\x0a\x04user\x12\x02\xc3\x28"
    bad_stop = b"\x2a\x05\x32\x03\xff\xfe\x00"  # params (5) -> stop_sequences (6)

    assert messages.first_non_utf8_string(descriptor, good) is None
    assert messages.first_non_utf8_string(descriptor, b"\x12\x01\xff") == "user_prompt"
    with_turn = good + b"\x22" + bytes([len(bad_turn)]) + bad_turn
    assert messages.first_non_utf8_string(descriptor, with_turn) == "history[2].content"
    assert messages.first_non_utf8_string(descriptor, bad_stop) == "params.stop_sequences[0]"
    refusal = messages.undecodable_request(descriptor, b"\x12\x01\xff", "bad UTF-8")
    assert str(refusal) == "user_prompt: is not valid UTF-8 (a proto string must be)"
    unlocated = messages.undecodable_request(descriptor, b"\x12\x09", "truncated")
    assert str(unlocated) == "request: is not a valid GenerateStreamRequest: truncated"


def engine_params(**values: object) -> llama_pb2.GenerateStreamRequest:
    message = llama_pb2.GenerateStreamRequest(user_prompt="q", system_prompt="sys")
    message.params.engine_specific_params.update(values)
    return message


def test_an_unknown_engine_specific_key_is_refused_naming_it() -> None:
    with pytest.raises(InvalidRequest) as caught:
        messages.llama_raw_request(engine_params(mirostat=2))

    assert caught.value.field == "params.engine_specific_params.mirostat"
    assert "json_schema" in str(caught.value)  # says which keys there are


@pytest.mark.parametrize("key", ["", "Top P", "a.b", "x: y"])
def test_an_unknown_key_that_is_no_plain_name_is_quoted_beside_a_readable_path(key: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        messages.llama_raw_request(engine_params(**{key: 2}))

    assert caught.value.field == "params.engine_specific_params"
    assert f"unknown key {key!r}" in str(caught.value)


def test_a_json_schema_key_becomes_the_constraint_with_whole_numbers() -> None:
    schema = {"type": "string", "maxLength": 20}
    raw = messages.llama_raw_request(engine_params(json_schema=schema))

    assert raw.constraint is not None
    assert raw.constraint.field == "params.engine_specific_params.json_schema"
    assert json.loads(raw.constraint.schema or "") == schema
    assert '"maxLength":20' in (raw.constraint.schema or "")  # not 20.0
    assert raw.system_prompt == "sys"


def test_tools_become_a_tool_constraint() -> None:
    tool = {"type": "function", "function": {"name": "get_time", "parameters": {}}}
    raw = messages.llama_raw_request(
        engine_params(tools=[tool], tool_choice="required", parallel_tool_calls=False)
    )

    assert raw.constraint is not None and raw.constraint.is_tool_call
    assert [spec.name for spec in raw.constraint.tools] == ["get_time"]
    assert not raw.constraint.parallel
    assert raw.system_prompt == "sys"  # core/prompt.py shows the tools to the model


def test_a_bad_tool_names_its_path_inside_engine_specific_params() -> None:
    with pytest.raises(InvalidRequest) as caught:
        messages.llama_raw_request(engine_params(tools=[{"type": "function", "function": {}}]))

    assert caught.value.field == "params.engine_specific_params.tools[0].function.name"
