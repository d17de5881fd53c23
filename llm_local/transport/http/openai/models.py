"""The model's id in the API and the /v1/models objects."""

from __future__ import annotations

from pathlib import PurePath
from typing import Any

OWNED_BY = "llm-local"


def model_id(model_name: str, configured_id: str | None) -> str:
    """A stable, readable id: `configured_id`, else derived from the model setting.

    A hub repo id stays as it is ("microsoft/Phi-3-mini-4k-instruct"); a file, a
    directory or a "package:" file becomes its last name without ".gguf"
    ("SmolLM2-135M-Instruct.Q4_1").
    """
    if configured_id:
        return configured_id
    name = model_name.strip()
    looks_like_path = name.startswith(("package:", "/", ".", "~")) or name.endswith(".gguf")
    if not looks_like_path:
        return name
    base = PurePath(name.removeprefix("package:").rstrip("/")).name
    return base.removesuffix(".gguf") or name


def accepted_names(model_name: str, configured_id: str | None) -> frozenset[str]:
    """What a request's `model` may say: the id, or the model setting itself."""
    return frozenset({model_id(model_name, configured_id), model_name.strip()})


def model_object(identifier: str, created: int) -> dict[str, Any]:
    return {"id": identifier, "object": "model", "created": created, "owned_by": OWNED_BY}


def model_list(identifier: str, created: int) -> dict[str, Any]:
    return {"object": "list", "data": [model_object(identifier, created)]}
