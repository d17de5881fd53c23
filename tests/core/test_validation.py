from __future__ import annotations

import dataclasses
import math

import pytest

from llm_local.core.errors import InvalidRequest
from llm_local.core.types import ChatTurn, RequestContext, Role, SamplingOptions, SamplingSupport
from llm_local.core.validation import RawParams, RawRequest, validate_request
from llm_local.settings.schema import GenerationDefaults

CONTEXT = RequestContext(request_id="req-1", tenant_id="tenant")


def params(**changes: object) -> RawRequest:
    return RawRequest(user_prompt="Hi", params=RawParams(**changes))  # type: ignore[arg-type]


INVALID = [
    pytest.param(RawRequest(user_prompt=""), "user_prompt", id="empty prompt"),
    pytest.param(RawRequest(user_prompt=" \n\t "), "user_prompt", id="whitespace prompt"),
    pytest.param(RawRequest(user_prompt="", prompt_field="prompt"), "prompt", id="seed-era field"),
    pytest.param(RawRequest(user_prompt="a\udc80b"), "user_prompt", id="lone surrogate"),
    pytest.param(
        RawRequest(user_prompt="Hi", system_prompt="\ud800"), "system_prompt", id="bad system"
    ),
    pytest.param(params(temperature=-0.1), "params.temperature", id="negative temperature"),
    pytest.param(params(temperature=math.nan), "params.temperature", id="NaN temperature"),
    pytest.param(params(temperature=math.inf), "params.temperature", id="inf temperature"),
    pytest.param(params(top_p=0.0), "params.top_p", id="top_p 0"),
    pytest.param(params(top_p=1.01), "params.top_p", id="top_p above 1"),
    pytest.param(params(top_p=-0.5), "params.top_p", id="negative top_p"),
    pytest.param(params(top_p=math.nan), "params.top_p", id="NaN top_p"),
    pytest.param(params(top_k=-1), "params.top_k", id="negative top_k"),
    pytest.param(params(repetition_penalty=0.0), "params.repetition_penalty", id="penalty 0"),
    pytest.param(params(repetition_penalty=-1.0), "params.repetition_penalty", id="penalty < 0"),
    pytest.param(
        params(repetition_penalty=math.nan), "params.repetition_penalty", id="NaN penalty"
    ),
    pytest.param(params(max_new_tokens=0), "params.max_new_tokens", id="max_new_tokens 0"),
    pytest.param(params(max_new_tokens=-5), "params.max_new_tokens", id="negative max_new"),
    pytest.param(params(max_new_tokens=513), "params.max_new_tokens", id="above the limit"),
    pytest.param(params(seed=-1), "params.seed", id="negative seed"),
    pytest.param(
        params(stop_sequences=("a", "b", "c", "d")), "params.stop_sequences", id="too many stops"
    ),
    pytest.param(
        params(stop_sequences=("a", "b", "")), "params.stop_sequences[2]", id="empty stop"
    ),
    pytest.param(
        params(stop_sequences=("x" * 11,)), "params.stop_sequences[0]", id="stop too long"
    ),
    pytest.param(
        RawRequest(user_prompt="Hi", history=(("user", "a"), ("robot", "b"))),
        "history[1].role",
        id="unknown role",
    ),
    pytest.param(
        RawRequest(user_prompt="Hi", history=(("user", "a"), ("assistant", "\udfff"))),
        "history[1].content",
        id="bad history content",
    ),
]


@pytest.mark.parametrize(("raw", "field"), INVALID)
def test_invalid_requests_name_the_field(
    raw: RawRequest, field: str, defaults: GenerationDefaults
) -> None:
    with pytest.raises(InvalidRequest) as caught:
        validate_request(raw, defaults, CONTEXT)
    assert caught.value.field == field
    assert str(caught.value).startswith(f"{field}: ")
    assert caught.value.message


def test_messages_say_what_is_allowed(defaults: GenerationDefaults) -> None:
    with pytest.raises(InvalidRequest) as caught:
        validate_request(params(max_new_tokens=513), defaults, CONTEXT)
    assert str(caught.value) == "params.max_new_tokens: must be at most 512, got 513"
    with pytest.raises(InvalidRequest) as caught:
        validate_request(params(max_new_tokens=0), defaults, CONTEXT)
    assert "at least 1" in caught.value.message
    with pytest.raises(InvalidRequest) as caught:
        validate_request(RawRequest(user_prompt="Hi", history=(("robot", "b"),)), defaults, CONTEXT)
    assert "'robot'" in caught.value.message
    assert "system, user, assistant" in caught.value.message


def test_unset_parameters_take_the_defaults(defaults: GenerationDefaults) -> None:
    request = validate_request(RawRequest(user_prompt="Hi"), defaults, CONTEXT)
    assert request.max_new_tokens == 64
    assert request.sampling == SamplingOptions(
        temperature=0.7, top_k=40, top_p=0.9, repetition_penalty=1.1, seed=None
    )
    assert request.stop_sequences == ()
    assert request.context == CONTEXT
    assert request.prompt_field == "user_prompt"


def test_set_parameters_win_over_defaults_including_zero(defaults: GenerationDefaults) -> None:
    raw = params(
        max_new_tokens=512,
        temperature=0.0,
        top_k=0,
        top_p=1.0,
        repetition_penalty=0.5,
        seed=0,
        stop_sequences=("\n\n", "END"),
    )
    request = validate_request(raw, defaults, CONTEXT)
    assert request.max_new_tokens == 512
    assert request.sampling == SamplingOptions(
        temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=0.5, seed=0
    )
    assert request.sampling.greedy
    assert request.stop_sequences == ("\n\n", "END")


def test_default_max_new_tokens_never_exceeds_the_limit(defaults: GenerationDefaults) -> None:
    tight = dataclasses.replace(defaults, max_new_tokens=1000, max_new_tokens_limit=100)
    assert validate_request(RawRequest(user_prompt="Hi"), tight, CONTEXT).max_new_tokens == 100


def test_conversation_fields_are_carried(defaults: GenerationDefaults) -> None:
    raw = RawRequest(
        user_prompt="And Spain?",
        system_prompt="Be brief.",
        rag_context="Madrid is the capital of Spain.",
        history=(("User", "Capital of France?"), (" assistant ", "Paris.")),
        prompt_field="prompt",
    )
    request = validate_request(raw, defaults, CONTEXT)
    assert request.user_prompt == "And Spain?"
    assert request.system_prompt == "Be brief."
    assert request.rag_context == "Madrid is the capital of Spain."
    assert request.history == (
        ChatTurn(Role.USER, "Capital of France?"),
        ChatTurn(Role.ASSISTANT, "Paris."),
    )
    assert request.prompt_field == "prompt"


def test_blank_rag_context_counts_as_absent(defaults: GenerationDefaults) -> None:
    raw = RawRequest(user_prompt="Hi", rag_context="  \n")
    assert validate_request(raw, defaults, CONTEXT).rag_context is None


def test_duplicate_stop_sequences_are_dropped(defaults: GenerationDefaults) -> None:
    request = validate_request(params(stop_sequences=("x", "y", "x")), defaults, CONTEXT)
    assert request.stop_sequences == ("x", "y")


def test_empty_history_content_is_allowed(defaults: GenerationDefaults) -> None:
    raw = RawRequest(user_prompt="Hi", history=(("assistant", ""),))
    assert validate_request(raw, defaults, CONTEXT).history == (ChatTurn(Role.ASSISTANT, ""),)


NO_PENALTY_NO_SEED = SamplingSupport(repetition_penalty=False, seed=False)


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        pytest.param(params(repetition_penalty=1.2), "params.repetition_penalty", id="penalty"),
        pytest.param(
            params(temperature=0.8, seed=7, repetition_penalty=1.0),
            "params.seed",
            id="sampled seed",
        ),
    ],
)
def test_options_the_backend_cannot_honour_are_refused_by_name(
    raw: RawRequest, field: str, defaults: GenerationDefaults
) -> None:
    with pytest.raises(InvalidRequest) as caught:
        validate_request(raw, defaults, CONTEXT, NO_PENALTY_NO_SEED)

    assert caught.value.field == field
    assert "this backend cannot" in caught.value.message
    validate_request(raw, defaults, CONTEXT)  # a backend that honours them takes it


def test_a_default_the_backend_cannot_honour_is_refused_under_the_field_it_fills(
    defaults: GenerationDefaults,
) -> None:
    assert defaults.repetition_penalty == 1.1

    with pytest.raises(InvalidRequest) as caught:
        validate_request(params(), defaults, CONTEXT, NO_PENALTY_NO_SEED)

    assert caught.value.field == "params.repetition_penalty"
    assert "1.1" in caught.value.message


def test_neutral_values_pass_a_backend_that_cannot_honour_the_option(
    defaults: GenerationDefaults,
) -> None:
    greedy_seeded = params(temperature=0.0, seed=7, repetition_penalty=1.0)

    request = validate_request(greedy_seeded, defaults, CONTEXT, NO_PENALTY_NO_SEED)

    # Greedy decoding ignores the seed: nothing is lost by taking it.
    assert request.sampling.seed == 7
    assert request.sampling.greedy
