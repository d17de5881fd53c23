"""The fake backend: deterministic, model-free, for unit tests of core and transports."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from llm_local.backends.base import BackendFactory
from llm_local.backends.fake.backend import DEFAULT_REPLY, FakeBackend, FakeCall, FakeConfig
from llm_local.backends.fake.tokenizer import (
    END_OF_TEXT,
    IM_END,
    IM_START,
    FakeTokenizer,
)

if TYPE_CHECKING:
    from llm_local.settings.schema import AppSettings


def create_backend(settings: AppSettings) -> FakeBackend:
    """The entry point ``fake``: configured by the optional ``[fake]`` settings table."""
    raw = settings.raw.get("fake") or settings.raw.get("FAKE") or {}
    if not isinstance(raw, dict):
        raise ValueError(f"settings table [fake] must be a table, got {raw!r}")
    config = FakeConfig.from_mapping(raw)
    configured_here = any(str(key).lower() == "context_limit" for key in raw)
    if settings.model.context_limit and not configured_here:
        config = dataclasses.replace(config, context_limit=settings.model.context_limit)
    return FakeBackend(config)


# mypy checks here that the fake really implements the Backend protocol.
_factory: BackendFactory = create_backend


__all__ = [
    "DEFAULT_REPLY",
    "END_OF_TEXT",
    "IM_END",
    "IM_START",
    "FakeBackend",
    "FakeCall",
    "FakeConfig",
    "FakeTokenizer",
    "create_backend",
]
