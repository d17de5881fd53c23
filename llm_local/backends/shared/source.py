"""The configured model's source, as a backend's load path needs it."""

from __future__ import annotations

from typing import TYPE_CHECKING

from llm_local.backends.base import BackendLoadError

if TYPE_CHECKING:
    from llm_local.convert.sources import ModelSource
    from llm_local.settings.schema import ModelSettings


def resolve_model_source(model: ModelSettings) -> ModelSource:
    """Identify `model.name`; BackendLoadError (its one-line reason) when it cannot be."""
    # Imported here: convert/ pulls in what serving alone does not need.
    from llm_local.convert.errors import ConversionError
    from llm_local.convert.sources import resolve_source

    try:
        return resolve_source(model)
    except ConversionError as exc:
        raise BackendLoadError(str(exc)) from exc
