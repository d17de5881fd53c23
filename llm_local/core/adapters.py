"""Which LoRA adapter a request names, checked against what the serving backend applies.

Pure: the adapter ids come from the backend's ModelInfo (the [adapters] it loaded), the
field's wire name from the transport (``lora_adapter_id`` on gRPC, ``model`` on the OpenAI
API). An id nobody configured is UnknownAdapter (NOT_FOUND / 404); any id on a backend
that applies no adapters is InvalidRequest naming the field and the backends that can.
"""

from __future__ import annotations

from llm_local.core.errors import InvalidRequest

# Backends of this project that apply LoRA adapters per request (README, "LoRA adapters").
# CTranslate2 has no run-time LoRA: an adapter would have to be merged into a separately
# converted model, which is simply another model.
ADAPTER_BACKENDS = ("llama_cpp", "transformers")


class UnknownAdapter(Exception):
    """The request names an adapter that is not configured: NOT_FOUND."""

    def __init__(self, field: str, adapter: str) -> None:
        super().__init__(field, adapter)
        self.field = field
        self.adapter = adapter

    def __str__(self) -> str:
        return f"{self.field}: no LoRA adapter {self.adapter!r} is configured on this server"


def check_adapter(
    requested: str | None, field: str, available: tuple[str, ...] | None, backend: str
) -> str | None:
    """The adapter id to apply (None: the base model); raises as the module says.

    Ids are matched case-insensitively (settings keys are lower-cased); an empty id means
    none, as an unset proto field does."""
    if requested is None or not requested.strip():
        return None
    if available is None:
        raise InvalidRequest(
            field,
            f"the {backend} backend cannot apply LoRA adapters; backends that can: "
            f"{', '.join(ADAPTER_BACKENDS)} (leave {field} unset here)",
        )
    adapter = requested.strip().lower()
    if adapter not in available:
        raise UnknownAdapter(field, requested)
    return adapter
