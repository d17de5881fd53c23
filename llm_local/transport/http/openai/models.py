"""The model's id in the API and the /v1/models objects."""

from __future__ import annotations

from collections.abc import Iterable
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


ADAPTER_SEPARATOR = ":"


def adapter_model_id(identifier: str, adapter: str) -> str:
    """A LoRA adapter's model id: "<base>:<adapter>" (the convention vLLM and Ollama
    clients know: one model id per base model and adapter)."""
    return f"{identifier}{ADAPTER_SEPARATOR}{adapter}"


def requested_adapter(
    model: str | None, names: frozenset[str], adapters: Iterable[str]
) -> tuple[bool, str | None]:
    """(known, adapter) for a request's `model`: the base model itself (adapter None),
    "<base>:<adapter>" with any accepted base name, or a configured adapter's bare id.
    An unknown adapter after a known base is still "known" here: core names it (404)."""
    if model is None or model in names:
        return True, None
    base, separator, adapter = model.rpartition(ADAPTER_SEPARATOR)
    if separator and base in names and adapter:
        return True, adapter
    if model.strip().lower() in adapters:
        return True, model
    return False, None


def model_object(identifier: str, created: int, parent: str | None = None) -> dict[str, Any]:
    found: dict[str, Any] = {
        "id": identifier,
        "object": "model",
        "created": created,
        "owned_by": OWNED_BY,
    }
    if parent is not None:
        found["parent"] = parent  # vLLM's field for an adapter's base model
    return found


def model_list(identifier: str, created: int, adapters: Iterable[str] = ()) -> dict[str, Any]:
    data = [model_object(identifier, created)]
    data += [
        model_object(adapter_model_id(identifier, adapter), created, parent=identifier)
        for adapter in adapters
    ]
    return {"object": "list", "data": data}
