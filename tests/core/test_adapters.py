"""Which LoRA adapter a request names: core's check against what the backend applies."""

from __future__ import annotations

import pytest

from llm_local.core.adapters import UnknownAdapter, check_adapter
from llm_local.core.errors import InvalidRequest


@pytest.mark.parametrize("requested", [None, "", "  "])
def test_no_adapter_means_the_base_model_on_any_backend(requested: str | None) -> None:
    assert check_adapter(requested, "lora_adapter_id", None, "ct2") is None
    assert check_adapter(requested, "lora_adapter_id", ("a",), "llama_cpp") is None


def test_a_configured_adapter_is_matched_case_insensitively() -> None:
    assert check_adapter("Support-V2", "model", ("support-v2",), "llama_cpp") == "support-v2"


def test_an_unknown_adapter_is_named() -> None:
    with pytest.raises(UnknownAdapter) as caught:
        check_adapter("parrot", "lora_adapter_id", ("pirate",), "llama_cpp")

    assert caught.value.field == "lora_adapter_id"
    assert str(caught.value) == (
        "lora_adapter_id: no LoRA adapter 'parrot' is configured on this server"
    )


def test_a_backend_without_adapters_refuses_the_field_naming_those_that_can() -> None:
    with pytest.raises(InvalidRequest) as caught:
        check_adapter("pirate", "model", None, "ct2")

    assert caught.value.field == "model"
    assert "the ct2 backend cannot apply LoRA adapters" in caught.value.message
    assert "llama_cpp" in caught.value.message
