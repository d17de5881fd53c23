"""Turn what a client sent into a GenerationRequest, or say exactly which field is wrong.

Transports copy wire messages into RawRequest (None = the field was not set, so the
configured default applies) and call validate_request. Every InvalidRequest names the
field with its proto-style path (``params.top_p``, ``history[1].role``).

Rules worth knowing:
- ``max_new_tokens`` set to 0 is rejected ("must be at least 1"): a stream that may
  generate nothing is never what a caller means, and "unset" already means "default".
- ``top_k`` 0 means "no top-k cut"; ``temperature`` 0 means greedy.
- History roles are matched case-insensitively after trimming ("User" is "user").
- Empty history content is allowed (an assistant turn may have said nothing).
- ``rag_context`` that is empty or only whitespace counts as absent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import trio

from llm_local.core.errors import InvalidRequest
from llm_local.core.structured.constraint import STRUCTURED_OUTPUT_BACKENDS, OutputConstraint
from llm_local.core.structured.limits import check_limits
from llm_local.core.types import (
    FULL_SAMPLING_SUPPORT,
    ChatTurn,
    GenerationRequest,
    RequestContext,
    Role,
    SamplingOptions,
    SamplingSupport,
)
from llm_local.settings.schema import GenerationDefaults

_ROLES = {role.value: role for role in Role}


@dataclass(frozen=True, slots=True)
class RawParams:
    """GenerationParams as received; None means "not set"."""

    max_new_tokens: int | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    stop_sequences: tuple[str, ...] = ()
    seed: int | None = None


@dataclass(frozen=True, slots=True)
class RawRequest:
    """A generation request as received, before any check."""

    user_prompt: str
    system_prompt: str = ""
    rag_context: str | None = None
    history: tuple[tuple[str, str], ...] = ()  # (role, content)
    params: RawParams = field(default_factory=RawParams)
    # The prompt's wire name: "user_prompt" (LlamaService) or "prompt" (LLMLocalService).
    prompt_field: str = "user_prompt"
    chat_template: bool = True  # False: a plain text completion (see GenerationRequest)
    constraint: OutputConstraint | None = None  # structured output (core/structured)
    adapter: str | None = None  # the LoRA adapter named (core/adapters.py checks it)
    adapter_field: str = "lora_adapter_id"  # its wire name, for errors


def validate_request(
    raw: RawRequest,
    defaults: GenerationDefaults,
    context: RequestContext,
    support: SamplingSupport = FULL_SAMPLING_SUPPORT,
) -> GenerationRequest:
    """A GenerationRequest with every default filled in; raises InvalidRequest.

    `support` says which sampling options the serving backend honours: a request whose
    options (its own or the defaults it inherits) need more is refused, naming the field.
    """
    _check_text(raw.prompt_field, raw.user_prompt)
    if not raw.user_prompt.strip():
        raise InvalidRequest(raw.prompt_field, "must not be empty")
    _check_text("system_prompt", raw.system_prompt)
    rag_context = raw.rag_context
    if rag_context is not None:
        _check_text("rag_context", rag_context)
        if not rag_context.strip():
            rag_context = None
    if not raw.chat_template and (raw.system_prompt or rag_context or raw.history):
        # Only a transport bug gets here: plain completions carry one text.
        raise InvalidRequest(raw.prompt_field, "a plain completion takes the prompt alone")
    params = raw.params
    history = _validate_history(raw.history)
    max_new_tokens = _validate_max_new_tokens(params.max_new_tokens, defaults)
    sampling = _validate_sampling(params, defaults)
    for option, reason in support.refusals(sampling):
        raise InvalidRequest(f"params.{option}", reason)
    if raw.constraint is not None:
        sampling = replace(
            sampling, constraint=_validate_constraint(raw.constraint, defaults, support)
        )
    return GenerationRequest(
        user_prompt=raw.user_prompt,
        system_prompt=raw.system_prompt,
        rag_context=rag_context,
        history=history,
        max_new_tokens=max_new_tokens,
        sampling=sampling,
        stop_sequences=_validate_stop_sequences(params.stop_sequences, defaults),
        context=context,
        prompt_field=raw.prompt_field,
        chat_template=raw.chat_template,
    )


async def validate_request_off_loop(
    raw: RawRequest,
    defaults: GenerationDefaults,
    context: RequestContext,
    support: SamplingSupport,
) -> GenerationRequest:
    """`validate_request`, on a worker thread when it would compile a grammar: a schema
    not seen before compiles in milliseconds, up to ~80 ms for a large one, which would
    stall every other request on the event loop. A request without structure, or with a
    constraint already compiled (the bounded cache), is validated here, with no thread hop."""
    checker = support.constraints
    if raw.constraint is None or checker is None or checker.is_compiled(raw.constraint):
        return validate_request(raw, defaults, context, support)
    return await trio.to_thread.run_sync(validate_request, raw, defaults, context, support)


def _validate_constraint(
    constraint: OutputConstraint, defaults: GenerationDefaults, support: SamplingSupport
) -> OutputConstraint:
    """Refused before admission: a backend that cannot constrain a step, a schema past the
    limits, a schema feature the backend's engine cannot enforce (never relaxed)."""
    if support.constraints is None:
        raise InvalidRequest(
            constraint.field,
            "structured output is not supported by this backend (it cannot constrain each "
            f"decoding step); backends that support it: {', '.join(STRUCTURED_OUTPUT_BACKENDS)}",
        )
    check_limits(
        constraint,
        max_schema_bytes=defaults.max_schema_bytes,
        max_schema_depth=defaults.max_schema_depth,
        max_tools=defaults.max_tools,
    )
    why = support.constraints.refusal(constraint)
    if why is not None:
        raise InvalidRequest(constraint.field, f"the schema cannot be enforced: {why}")
    return constraint


def _check_text(field_name: str, text: str) -> None:
    # Python callers (tests, the CLI) can pass lone surrogates, which no tokenizer can
    # encode; protobuf strings never contain them.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidRequest(
            field_name, f"is not valid Unicode text (position {exc.start})"
        ) from None


def _validate_history(history: tuple[tuple[str, str], ...]) -> tuple[ChatTurn, ...]:
    turns: list[ChatTurn] = []
    for index, (role_text, content) in enumerate(history):
        role = _ROLES.get(role_text.strip().lower())
        if role is None:
            allowed = ", ".join(_ROLES)
            raise InvalidRequest(
                f"history[{index}].role", f"unknown role {role_text!r}; allowed: {allowed}"
            )
        _check_text(f"history[{index}].content", content)
        turns.append(ChatTurn(role=role, content=content))
    return tuple(turns)


def _validate_max_new_tokens(value: int | None, defaults: GenerationDefaults) -> int:
    limit = defaults.max_new_tokens_limit
    if value is None:
        return min(defaults.max_new_tokens, limit)
    if value < 1:
        raise InvalidRequest("params.max_new_tokens", f"must be at least 1, got {value}")
    if value > limit:
        raise InvalidRequest("params.max_new_tokens", f"must be at most {limit}, got {value}")
    return value


def _validate_sampling(params: RawParams, defaults: GenerationDefaults) -> SamplingOptions:
    temperature = defaults.temperature if params.temperature is None else params.temperature
    if not math.isfinite(temperature) or temperature < 0:
        raise InvalidRequest(
            "params.temperature", f"must be a finite number >= 0, got {temperature}"
        )
    top_p = defaults.top_p if params.top_p is None else params.top_p
    if not (0.0 < top_p <= 1.0):  # also rejects NaN
        raise InvalidRequest("params.top_p", f"must be in (0, 1], got {top_p}")
    top_k = defaults.top_k if params.top_k is None else params.top_k
    if top_k < 0:
        raise InvalidRequest("params.top_k", f"must be >= 0 (0 = no limit), got {top_k}")
    penalty = (
        defaults.repetition_penalty
        if params.repetition_penalty is None
        else params.repetition_penalty
    )
    if not math.isfinite(penalty) or penalty <= 0:
        raise InvalidRequest(
            "params.repetition_penalty", f"must be a finite number > 0, got {penalty}"
        )
    if params.seed is not None and params.seed < 0:
        raise InvalidRequest("params.seed", f"must be >= 0, got {params.seed}")
    return SamplingOptions(
        temperature=float(temperature),
        top_k=int(top_k),
        top_p=float(top_p),
        repetition_penalty=float(penalty),
        seed=params.seed,
    )


def _validate_stop_sequences(
    stops: tuple[str, ...], defaults: GenerationDefaults
) -> tuple[str, ...]:
    if len(stops) > defaults.max_stop_sequences:
        raise InvalidRequest(
            "params.stop_sequences",
            f"at most {defaults.max_stop_sequences} stop sequences, got {len(stops)}",
        )
    longest = defaults.max_stop_sequence_length
    for index, stop in enumerate(stops):
        name = f"params.stop_sequences[{index}]"
        _check_text(name, stop)
        if not stop:
            raise InvalidRequest(name, "must not be empty")
        if len(stop) > longest:
            raise InvalidRequest(name, f"must be at most {longest} characters, got {len(stop)}")
    # Duplicates change nothing; dropping them keeps the matcher's work small.
    return tuple(dict.fromkeys(stops))
