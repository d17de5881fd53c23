"""Structured output on the llama_cpp backend, real SmolLM2 GGUF: every answer fits its
grammar (a JSON schema, tool calls), whatever the model would rather say, and a
constrained request decodes in one batch beside an unconstrained one."""

from __future__ import annotations

import dataclasses
import datetime
import json
from collections.abc import AsyncIterator

import jsonschema
import pytest
import trio

from llm_local.backends.llama_cpp.backend import LlamaCppBackend
from llm_local.backends.llama_cpp.loader import plan_from_settings
from llm_local.backends.shared.grammar import without_formats
from llm_local.core.prompt import prepare_prompt
from llm_local.core.structured import tools as fmt
from llm_local.core.structured.constraint import (
    OutputConstraint,
    ToolMode,
    ToolSpec,
    canonical_json,
)
from llm_local.core.types import (
    Finished,
    FinishReason,
    GenerationRequest,
    SamplingOptions,
)
from llm_local.settings.loader import load_settings
from tests.backends.generation import answer_text
from tests.backends.llama_cpp.scoring import NEAR_TIE_NATS, Scorer

pytestmark = pytest.mark.model

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "city": {"enum": ["Paris", "Rome", "Berlin"]},
    },
    "required": ["name", "age", "city"],
    "additionalProperties": False,
}
WEATHER = ToolSpec(
    name="get_weather",
    description="The current weather in a city",
    parameters=canonical_json(
        {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 30}},
            "required": ["city"],
            "additionalProperties": False,
        }
    ),
)


@pytest.fixture
async def backend() -> AsyncIterator[LlamaCppBackend]:
    loaded = load_settings(env="test")
    options = dataclasses.replace(loaded.llama_cpp, kv_cache_tokens=4096, sequences=4)
    app_settings = dataclasses.replace(loaded, llama_cpp=options)
    backend = LlamaCppBackend(lambda: plan_from_settings(app_settings))
    await backend.load()
    yield backend
    await backend.aclose()


async def generate(
    backend: LlamaCppBackend, question: str, constraint: OutputConstraint | None, tokens: int
) -> tuple[str, Finished]:
    request = GenerationRequest(
        user_prompt=question,
        max_new_tokens=tokens,
        sampling=SamplingOptions(constraint=constraint),
    )
    return await answer_text(backend, request)


async def test_a_schema_constrained_answer_parses_and_validates(
    backend: LlamaCppBackend,
) -> None:
    constraint = OutputConstraint(field="response_format", schema=canonical_json(PERSON))
    text, finished = await generate(backend, "Describe a person.", constraint, 60)
    assert finished.reason is FinishReason.STOP, text  # the grammar ended it: EOS allowed
    jsonschema.validate(json.loads(text), PERSON)


async def test_a_forced_tool_call_reads_back_with_valid_arguments(
    backend: LlamaCppBackend,
) -> None:
    constraint = OutputConstraint(field="tools", tools=(WEATHER,), parallel=False)
    text, finished = await generate(backend, "Weather in Paris?", constraint, 60)
    answer = fmt.read_answer(text)
    assert finished.reason is FinishReason.STOP, text
    assert [name for name, _ in answer.calls] == ["get_weather"], text
    jsonschema.validate(json.loads(answer.calls[0][1]), WEATHER.parameters_schema())


async def test_constrained_and_free_requests_decode_side_by_side(
    backend: LlamaCppBackend,
) -> None:
    schema = OutputConstraint(field="response_format", schema=canonical_json(PERSON))
    auto = OutputConstraint(field="tools", tools=(WEATHER,), mode=ToolMode.AUTO)
    results: dict[str, tuple[str, Finished]] = {}

    async def one(key: str, constraint: OutputConstraint | None) -> None:
        results[key] = await generate(backend, "Describe a person.", constraint, 40)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(one, "free", None)
        nursery.start_soon(one, "schema", schema)
        nursery.start_soon(one, "auto", auto)
    jsonschema.validate(json.loads(results["schema"][0]), PERSON)
    free_text, _ = results["free"]
    alone, _ = await generate(backend, "Describe a person.", None, 40)
    # Greedy: the neighbours' masks never touch its row. A mask on it would have made it
    # JSON or a tool call; and where it parts from its alone-answer (llama.cpp's rounding
    # follows the batch's shape: scoring.py), the model finds both tokens about as likely.
    assert not free_text.lstrip().startswith(("{", "<")), free_text
    if free_text != alone:
        request = GenerationRequest(user_prompt="Describe a person.", max_new_tokens=40)
        prompt = prepare_prompt(request, backend.tokenizer, backend.info.context_limit).ids
        scorer = Scorer(backend, plan_from_settings(load_settings(env="test")).gguf)
        try:
            gap = scorer.divergence_gap(prompt, free_text, alone)
        finally:
            scorer.free()
        assert gap <= NEAR_TIE_NATS, (gap, free_text, alone)
    auto_text = results["auto"][0]
    # auto: a text answer (not starting with "<") or well-formed calls
    answer = fmt.read_answer(auto_text)
    assert answer.text or answer.calls


def test_unknown_formats_are_dropped_as_annotations_and_data_is_left_alone() -> None:
    schema = {
        "type": "object",
        "properties": {
            "home": {"type": "string", "format": "url"},
            "born": {"type": "string", "format": "date"},
            "format": {"const": {"format": "url"}},
        },
        "anyOf": [{"format": "url"}],
    }
    assert without_formats(schema, frozenset({"url"})) == {
        "type": "object",
        "properties": {
            "home": {"type": "string"},
            "born": {"type": "string", "format": "date"},
            "format": {"const": {"format": "url"}},
        },
        "anyOf": [{}],
    }


async def test_a_schema_naming_an_unknown_format_is_served_and_known_formats_still_hold(
    backend: LlamaCppBackend,
) -> None:
    schema = {
        "type": "object",
        "properties": {
            "home": {"type": "string", "format": "url", "maxLength": 30},
            "born": {"type": "string", "format": "date"},
        },
        "required": ["home", "born"],
        "additionalProperties": False,
    }
    constraint = OutputConstraint(field="response_format", schema=canonical_json(schema))
    grammar = backend.info.sampling.constraints
    assert grammar is not None and grammar.refusal(constraint) is None
    empty = {"type": "string", "format": ""}  # a JSONSchemaBench schema names this one
    assert grammar.refusal(OutputConstraint(field="f", schema=canonical_json(empty))) is None
    beside = {"type": "string", "format": "url", "not": {"const": "x"}}  # still refused: `not`
    assert "not" in (
        grammar.refusal(OutputConstraint(field="f", schema=canonical_json(beside))) or ""
    )

    text, finished = await generate(backend, "Give a web page and a birth date.", constraint, 60)

    assert finished.reason is FinishReason.STOP, text
    answer = json.loads(text)
    jsonschema.validate(answer, schema)
    datetime.date.fromisoformat(answer["born"])  # "date" is still enforced
