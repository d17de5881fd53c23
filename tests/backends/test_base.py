"""The backend registry: backends are entry points named by settings."""

from __future__ import annotations

import pytest

import llm_local.backends.ct2
import llm_local.backends.fake
from llm_local.backends.base import (
    UnknownBackendError,
    available_backends,
    create_backend,
    load_backend_factory,
)
from llm_local.backends.ct2 import CT2Backend


def test_the_ct2_entry_point_is_the_ct2_factory() -> None:
    assert load_backend_factory("ct2") is llm_local.backends.ct2.create_backend


def test_the_fake_entry_point_is_the_fake_factory() -> None:
    assert load_backend_factory("fake") is llm_local.backends.fake.create_backend


def test_both_shipped_backends_are_listed() -> None:
    assert {"ct2", "fake"} <= set(available_backends())


def test_an_unknown_backend_names_itself_and_the_installed_ones() -> None:
    with pytest.raises(UnknownBackendError) as caught:
        load_backend_factory("no-such-backend")
    message = str(caught.value)
    assert "unknown backend 'no-such-backend'" in message
    assert f"installed backends: {', '.join(available_backends())}" in message


def test_settings_choose_the_backend() -> None:
    from llm_local.settings.loader import load_settings

    backend = create_backend(load_settings(env="test", overrides={"backend": "ct2"}))
    # Creating is cheap and loads nothing: load() does the work.
    assert isinstance(backend, CT2Backend)
    assert backend.stats().running == 0
