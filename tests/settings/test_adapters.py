"""[adapters]: adapter id -> source, validated with the rest of the settings."""

from __future__ import annotations

import pytest

from llm_local.settings.errors import SettingsError
from llm_local.settings.loader import load_settings
from llm_local.settings.schema import AdapterSettings


def test_no_adapters_by_default() -> None:
    settings = load_settings(env="test")

    assert settings.adapters == ()
    assert "adapters" not in settings.raw


def test_adapters_come_typed_in_id_order_with_lower_case_ids() -> None:
    settings = load_settings(
        env="test", overrides={"adapters": {"Robot": "/a/robot", "pirate": " acme/pirate "}}
    )

    assert settings.adapters == (
        AdapterSettings("pirate", "acme/pirate"),
        AdapterSettings("robot", "/a/robot"),
    )
    assert settings.raw["adapters"] == {"pirate": "acme/pirate", "robot": "/a/robot"}


def test_an_adapter_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLM_LOCAL_SERVICE_ADAPTERS__SUPPORT_V2", "/models/support")

    assert load_settings(env="test").adapters == (AdapterSettings("support_v2", "/models/support"),)


def test_bad_ids_and_sources_are_all_reported_at_once() -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings(
            env="test",
            overrides={"adapters": {"base:x": "/a", "empty": "", "number": 3, "ok": "/b"}},
        )

    assert sorted(caught.value.keys) == ["adapters.base:x", "adapters.empty", "adapters.number"]
