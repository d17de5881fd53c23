"""Structured output on the transformers backend, real SmolLM2 (the GGUF dequantized):
answers fit their grammar (a JSON schema, a forced tool call) while an unconstrained
request decodes in the same batches, untouched by its neighbours' masks.

One test, one load: loading dequantizes the GGUF, the longest part of the test.
"""

from __future__ import annotations

import json

import jsonschema
import pytest
import trio

from llm_local.backends.transformers.backend import TransformersBackend
from llm_local.backends.transformers.loader import plan_from_settings
from llm_local.core.prompt import prepare_prompt
from llm_local.core.structured import tools as fmt
from llm_local.core.structured.constraint import OutputConstraint, ToolSpec, canonical_json
from llm_local.core.types import (
    Finished,
    FinishReason,
    GenerationRequest,
    SamplingOptions,
)
from llm_local.settings.loader import load_settings
from tests.backends.generation import answer_text
from tests.backends.transformers.scoring import NEAR_TIE_NATS, Scorer

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
QUESTION = "Describe a person."
FREE_TOKENS = 24


async def generate(
    backend: TransformersBackend, question: str, constraint: OutputConstraint | None, tokens: int
) -> tuple[str, Finished]:
    request = GenerationRequest(
        user_prompt=question,
        max_new_tokens=tokens,
        sampling=SamplingOptions(constraint=constraint),
    )
    return await answer_text(backend, request)


async def test_constrained_answers_fit_their_grammar_beside_a_free_request() -> None:
    settings = load_settings(env="test")
    backend = TransformersBackend(lambda: plan_from_settings(settings), settings.transformers)
    await backend.load()
    try:
        assert backend.info.sampling.constraints is not None  # CPU: synchronous batching
        schema = OutputConstraint(field="response_format", schema=canonical_json(PERSON))
        call = OutputConstraint(field="tools", tools=(WEATHER,), parallel=False)
        results: dict[str, tuple[str, Finished]] = {}

        async def one(key: str, question: str, constraint: OutputConstraint | None) -> None:
            tokens = FREE_TOKENS if constraint is None else 60
            results[key] = await generate(backend, question, constraint, tokens)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(one, "free", QUESTION, None)
            nursery.start_soon(one, "schema", QUESTION, schema)
            nursery.start_soon(one, "call", "Weather in Paris?", call)
        alone, _ = await generate(backend, QUESTION, None, FREE_TOKENS)
        prompt = prepare_prompt(
            GenerationRequest(user_prompt=QUESTION, max_new_tokens=FREE_TOKENS),
            backend.tokenizer,
            backend.info.context_limit,
        ).ids
    finally:
        await backend.aclose()

    text, finished = results["schema"]
    assert finished.reason is FinishReason.STOP, text  # the grammar ended it: EOS allowed
    jsonschema.validate(json.loads(text), PERSON)

    text, finished = results["call"]
    answer = fmt.read_answer(text)
    assert finished.reason is FinishReason.STOP, text
    assert [name for name, _ in answer.calls] == ["get_weather"], text
    jsonschema.validate(json.loads(answer.calls[0][1]), WEATHER.parameters_schema())

    # Greedy: the neighbours' masks never touch the free row. A mask on it would have made
    # it JSON or a tool call; where it parts from its alone-answer (the batch's shape
    # changes the rounding: scoring.py), the model finds both tokens about as likely.
    free_text, _ = results["free"]
    assert not free_text.lstrip().startswith(("{", "<")), free_text
    if free_text != alone:
        gap = Scorer(settings).divergence_gap(prompt, free_text, alone)
        assert gap <= NEAR_TIE_NATS, (gap, free_text, alone)
