import json
from pathlib import Path

import pytest

from bench.jsonschemabench import load_formatter, request_from_messages, validates
from llm_local.core.structured.constraint import OutputConstraint
from llm_local.core.types import ChatTurn, Role

CONSTRAINT = OutputConstraint(field="bench", schema='{"type":"object"}')

HARNESS_MESSAGES = """
from json import dumps

def few_shots_messages_formatter(task, schema, num_shots=None):
    return [
        {"role": "system", "content": "You need to generate a JSON object."},
        {"role": "user", "content": task + " example"},
        {"role": "assistant", "content": "{}"},
        {"role": "user", "content": dumps(schema)},
    ]
"""


def test_the_formatter_is_the_harness_own(tmp_path: Path) -> None:
    (tmp_path / "core").mkdir()
    (tmp_path / "core" / "messages.py").write_text(HARNESS_MESSAGES)
    formatter = load_formatter(tmp_path)
    messages = formatter("Github_hard", {"type": "object"})
    assert [turn["role"] for turn in messages] == ["system", "user", "assistant", "user"]
    assert messages[1]["content"] == "Github_hard example"


def test_a_folder_that_is_not_the_harness_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="epfl-dlab/jsonschemabench"):
        load_formatter(tmp_path)


def test_the_chat_becomes_system_prompt_worked_examples_and_the_schema_last() -> None:
    messages = [
        {"role": "system", "content": "Answer with JSON."},
        {"role": "user", "content": '{"type": "integer"}'},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": '{"type": "object"}'},
    ]
    request = request_from_messages(messages, CONSTRAINT, 2048)
    assert request.system_prompt == "Answer with JSON."
    assert request.history == (
        ChatTurn(Role.USER, '{"type": "integer"}'),
        ChatTurn(Role.ASSISTANT, "4"),
    )
    assert request.user_prompt == '{"type": "object"}'
    assert request.max_new_tokens == 2048
    assert request.sampling.constraint == CONSTRAINT
    assert request.sampling.temperature == 0.0


def test_a_chat_not_ending_with_the_user_is_refused() -> None:
    with pytest.raises(ValueError, match="user turn last"):
        request_from_messages([{"role": "system", "content": "x"}], CONSTRAINT, 16)


def test_formats_are_asserted() -> None:
    schema = {"type": "object", "properties": {"host": {"type": "string", "format": "ipv4"}}}
    assert validates(json.dumps({"host": "10.0.0.1"}), schema)
    assert not validates(json.dumps({"host": "999.0.0.1"}), schema)
    dated = {"type": "string", "format": "date"}
    assert validates('"2026-12-06"', dated)
    assert not validates('"06/12/2026"', dated)


def test_schemas_are_read_as_draft_2020_12_whatever_they_name() -> None:
    # Draft 4's boolean exclusiveMaximum is not valid 2020-12: the harness fails every answer.
    draft4 = {
        "$schema": "http://json-schema.org/draft-04/schema#",
        "type": "number",
        "maximum": 5,
        "exclusiveMaximum": True,
    }
    assert not validates("1", draft4)
    assert validates("1", {"$schema": "http://json-schema.org/draft-04/schema#", "type": "number"})


def test_an_answer_that_does_not_parse_fails() -> None:
    assert not validates('{"a": ', {"type": "object"})
