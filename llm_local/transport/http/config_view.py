"""The body of GET /config: the effective settings, secrets redacted, plus versions."""

from __future__ import annotations

import dataclasses
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from llm_local.service import Service
    from llm_local.settings.schema import AppSettings

# Read from package metadata: importing transformers would cost seconds and memory.
VERSIONED_DISTRIBUTIONS = (
    "llm-local",
    "ctranslate2",
    "transformers",
    "tokenizers",
    "llama-cpp-python",
)


def package_versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for name in VERSIONED_DISTRIBUTIONS:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def _redacted_settings(raw: dict[str, object]) -> dict[str, Any]:
    from llm_local.settings.redact import redact

    return _jsonable(redact(raw))  # type: ignore[no-any-return]


def _typed_section(settings: AppSettings, name: str) -> dict[str, Any]:
    section = getattr(settings, name)
    return _jsonable(dataclasses.asdict(section))  # type: ignore[no-any-return]


def config_body(service: Service) -> dict[str, Any]:
    settings = service.settings
    info = service.state.model_info
    effective: dict[str, Any] = {
        "env": settings.env,
        "backend": settings.backend,
        "model": {
            "name": settings.model.name,
            "revision": settings.model.revision,
            "quantization": settings.model.quantization,
            "context_limit": settings.model.context_limit,
        },
        "device": settings.runtime.device,
        "compute_type": settings.runtime.compute_type,
        "runtime": _typed_section(settings, "runtime"),
        "numerics": _typed_section(settings, "numerics"),
        "generation": _typed_section(settings, "generation"),
        "capacity": _typed_section(settings, "capacity"),
        "ports": {
            "http": settings.server.http_port,
            "grpc": settings.server.grpc_port,
            "metrics": settings.server.metrics_port,
        },
        "tls": {"enabled": settings.tls.enabled, "mutual": settings.tls.mutual},
        "logging": _typed_section(settings, "logging"),
        # LoRA adapters requests may name: id -> source ([adapters]).
        "adapters": {adapter.id: adapter.source for adapter in settings.adapters},
    }
    if info is not None:
        # What the device really runs, which "auto" settings do not say.
        effective["loaded_model"] = {
            "backend": info.backend,
            "model_name": info.model_name,
            "device": info.device,
            "compute_type": info.compute_type,
            "context_limit": info.context_limit,
            "numerics": None if info.numerics is None else info.numerics.to_json(),
            "threads": (
                None
                if info.threads is None
                else {"inter_threads": info.threads[0], "intra_threads": info.threads[1]}
            ),
            # Which sampling options the backend honours (the rest are refused by name).
            "sampling_support": {
                "repetition_penalty": info.sampling.repetition_penalty,
                "seed": info.sampling.seed,
            },
            # The adapters loaded; None: this backend applies none.
            "adapters": None if info.adapters is None else list(info.adapters),
            # Each adapter's numerics verdict, where the backend checks them (llama_cpp).
            "adapter_numerics": {
                adapter: status.to_json() for adapter, status in info.adapter_numerics
            },
        }
    return {
        "effective": effective,
        "versions": package_versions(),
        "settings": _redacted_settings(settings.raw),
    }
