from __future__ import annotations

import dataclasses

from llm_local.backends.base import available_backends, create_backend
from llm_local.backends.fake import FakeBackend
from llm_local.settings.loader import load_settings


def test_entry_point_builds_the_fake_from_settings() -> None:
    settings = load_settings(env="test")
    settings = dataclasses.replace(
        settings,
        backend="fake",
        raw={**settings.raw, "fake": {"token_delay_s": 0.25, "reply": "pong"}},
    )
    assert "fake" in available_backends()
    backend = create_backend(settings)
    assert isinstance(backend, FakeBackend)
    assert (backend.config.token_delay_s, backend.config.reply) == (0.25, "pong")


def test_model_context_limit_setting_applies_unless_the_fake_table_sets_one() -> None:
    settings = load_settings(env="test")
    model = dataclasses.replace(settings.model, context_limit=512)
    settings = dataclasses.replace(settings, backend="fake", model=model)
    assert create_backend(settings).info.context_limit == 512
    settings = dataclasses.replace(settings, raw={**settings.raw, "fake": {"context_limit": 99}})
    assert create_backend(settings).info.context_limit == 99
