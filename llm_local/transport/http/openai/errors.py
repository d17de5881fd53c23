"""OpenAI's error shape, ``{"error": {"message", "type", "param", "code"}}``, and which
HTTP status each outcome of the flow gets, so that the official clients raise their
typed exceptions (BadRequestError, AuthenticationError, RateLimitError, ...)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from llm_local.serving import CallError, Code

INVALID_REQUEST = "invalid_request_error"
SERVER_ERROR = "server_error"
# A client at capacity may try again soon; the clients honour this header.
RETRY_AFTER_S = 1


@dataclass(frozen=True)
class OpenAIError(Exception):
    status: int
    message: str
    type: str = INVALID_REQUEST
    param: str | None = None
    code: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def from_call_error(error: CallError, translate: Callable[[str], str]) -> OpenAIError:
    """The HTTP answer to a flow's CallError; `translate` maps core's field names to
    the request body's ("params.top_p" -> "top_p")."""
    code = error.code
    if code is Code.INVALID_ARGUMENT:
        if error.field is None:  # x-tenant-id required
            return OpenAIError(400, error.message, param=None, code="missing_tenant_id")
        reason = error.message.removeprefix(f"{error.field}: ")
        param = translate(error.field)
        return OpenAIError(400, f"{param}: {reason}", param=param, code="invalid_value")
    if code is Code.NOT_FOUND:  # an unknown LoRA adapter named by `model`
        found = error.message.removeprefix(f"{error.field}: ")
        name = translate(error.field) if error.field else None
        return OpenAIError(404, found, param=name, code="model_not_found")
    if code is Code.RESOURCE_EXHAUSTED:
        return OpenAIError(
            429,
            error.message,
            type="rate_limit_error",
            code="server_at_capacity",
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )
    if code is Code.UNAVAILABLE:
        return OpenAIError(503, error.message, type=SERVER_ERROR, code="service_unavailable")
    if code is Code.DEADLINE_EXCEEDED:
        return OpenAIError(504, error.message, type=SERVER_ERROR, code="timeout")
    return OpenAIError(500, error.message, type=SERVER_ERROR, code="internal_error")


def unauthorized() -> OpenAIError:
    return OpenAIError(
        401,
        "a valid API key is required: send it as 'Authorization: Bearer <key>'",
        code="invalid_api_key",
        headers={"WWW-Authenticate": "Bearer"},
    )


def model_not_found(name: str) -> OpenAIError:
    return OpenAIError(
        404, f"The model '{name}' does not exist", param="model", code="model_not_found"
    )


def too_large(limit: int) -> OpenAIError:
    return OpenAIError(
        413,
        f"the request body is larger than {limit} bytes (openai.max_body_bytes)",
        code="request_too_large",
    )
