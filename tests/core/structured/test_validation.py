"""A request for structure in core's validation: refused before admission by a backend
without a grammar engine (naming the field and the backends that can), or naming the
feature the engine cannot enforce; else carried on the sampling options."""

from __future__ import annotations

import pytest

from llm_local.core.errors import InvalidRequest
from llm_local.core.structured.constraint import OutputConstraint, canonical_json
from llm_local.core.types import RequestContext, SamplingSupport
from llm_local.core.validation import RawRequest, validate_request
from llm_local.settings.schema import GenerationDefaults

CONSTRAINT = OutputConstraint("response_format", schema=canonical_json({"type": "object"}))
CONTEXT = RequestContext(request_id="r")


class Checker:
    def __init__(self, why: str | None) -> None:
        self.why = why
        self.seen: list[OutputConstraint] = []

    def refusal(self, constraint: OutputConstraint) -> str | None:
        self.seen.append(constraint)
        return self.why


def test_a_backend_without_a_grammar_engine_refuses_naming_the_field_and_who_can(
    defaults: GenerationDefaults,
) -> None:
    raw = RawRequest(user_prompt="hi", constraint=CONSTRAINT)
    with pytest.raises(InvalidRequest) as caught:
        validate_request(raw, defaults, CONTEXT, SamplingSupport())
    assert caught.value.field == "response_format"
    assert "llama_cpp" in str(caught.value)


def test_a_feature_the_engine_cannot_enforce_is_refused_naming_it(
    defaults: GenerationDefaults,
) -> None:
    support = SamplingSupport(constraints=Checker('Unimplemented keys: ["not"]'))
    raw = RawRequest(user_prompt="hi", constraint=CONSTRAINT)
    with pytest.raises(InvalidRequest) as caught:
        validate_request(raw, defaults, CONTEXT, support)
    assert caught.value.field == "response_format"
    assert '"not"' in str(caught.value)


def test_an_enforceable_constraint_rides_on_the_sampling_options(
    defaults: GenerationDefaults,
) -> None:
    checker = Checker(None)
    raw = RawRequest(user_prompt="hi", constraint=CONSTRAINT)
    valid = validate_request(raw, defaults, CONTEXT, SamplingSupport(constraints=checker))
    assert valid.sampling.constraint == CONSTRAINT
    assert checker.seen == [CONSTRAINT]
