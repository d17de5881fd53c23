"""A request for structure in core's validation: refused before admission by a backend
without a grammar engine (naming the field and the backends that can), or naming the
feature the engine cannot enforce; else carried on the sampling options. A grammar not
compiled yet compiles on a worker thread, not on the event loop's."""

from __future__ import annotations

import threading

import pytest

from llm_local.core.errors import InvalidRequest
from llm_local.core.structured.constraint import OutputConstraint, canonical_json
from llm_local.core.types import RequestContext, SamplingSupport
from llm_local.core.validation import RawRequest, validate_request, validate_request_off_loop
from llm_local.settings.schema import GenerationDefaults

CONSTRAINT = OutputConstraint("response_format", schema=canonical_json({"type": "object"}))
CONTEXT = RequestContext(request_id="r")


class Checker:
    def __init__(self, why: str | None, compiled: bool = True) -> None:
        self.why = why
        self.compiled = compiled
        self.seen: list[OutputConstraint] = []
        self.threads: list[int] = []

    def is_compiled(self, constraint: OutputConstraint) -> bool:
        return self.compiled

    def refusal(self, constraint: OutputConstraint) -> str | None:
        self.seen.append(constraint)
        self.threads.append(threading.get_ident())
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


async def test_a_grammar_not_compiled_yet_compiles_off_the_event_loop_thread(
    defaults: GenerationDefaults,
) -> None:
    raw = RawRequest(user_prompt="hi", constraint=CONSTRAINT)
    new, cached = Checker(None, compiled=False), Checker(None, compiled=True)

    valid = await validate_request_off_loop(
        raw, defaults, CONTEXT, SamplingSupport(constraints=new)
    )
    await validate_request_off_loop(raw, defaults, CONTEXT, SamplingSupport(constraints=cached))

    assert valid.sampling.constraint == CONSTRAINT
    assert new.threads and new.threads[0] != threading.get_ident()  # a worker compiled it
    assert cached.threads == [threading.get_ident()]  # a cache hit: no thread hop


async def test_a_compile_error_off_the_loop_is_still_refused_naming_the_field(
    defaults: GenerationDefaults,
) -> None:
    support = SamplingSupport(constraints=Checker('Unimplemented keys: ["not"]', compiled=False))
    raw = RawRequest(user_prompt="hi", constraint=CONSTRAINT)
    with pytest.raises(InvalidRequest) as caught:
        await validate_request_off_loop(raw, defaults, CONTEXT, support)
    assert caught.value.field == "response_format"
    assert '"not"' in str(caught.value)
