"""OpenAI request bodies -> core's RawRequest, pure.

Every field of a body is mapped, accepted only at the value that changes nothing
(``n: 1``, ``presence_penalty: 0``, ``logprobs: false``, ...), or refused with a 400
naming it; an unknown field is refused too, as OpenAI's own API does. Core validates
the ranges afterwards; `FieldNames` turns the fields it names back into the body's.

The conversation: leading system (or developer) message -> system prompt, the last
message (which must be the user's) -> the prompt, the rest -> history, in order.
A completion's prompt is sent to the model as is, with no chat template.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal, TypeVar

from llm_local.core.errors import InvalidRequest
from llm_local.core.structured import tools as fmt
from llm_local.core.validation import RawParams, RawRequest
from llm_local.settings.schema import OpenAISettings
from llm_local.transport.http.openai.structured import assistant_calls_text, parse_structure

Kind = Literal["chat", "completion"]
T = TypeVar("T")

_COMMON = frozenset(
    {
        "model", "max_tokens", "temperature", "top_p", "stop", "seed", "stream",
        "stream_options", "n", "user", "presence_penalty", "frequency_penalty",
        "logit_bias", "logprobs",
        # Extensions vLLM also takes (the clients send them with extra_body).
        "top_k", "repetition_penalty",
    }
)  # fmt: skip
_CHAT_ONLY = frozenset(
    {
        "messages", "max_completion_tokens", "top_logprobs", "tools", "tool_choice",
        "parallel_tool_calls", "response_format", "functions", "function_call",
    }
)  # fmt: skip
_COMPLETION_ONLY = frozenset({"prompt", "echo", "suffix", "best_of"})
_KNOWN: dict[Kind, frozenset[str]] = {
    "chat": _COMMON | _CHAT_ONLY,
    "completion": _COMMON | _COMPLETION_ONLY,
}
# A tool result reaches the model as a user turn (core/structured/tools.py).
_ROLES = {
    "system": "system", "developer": "system", "user": "user", "assistant": "assistant",
    "tool": "user",
}  # fmt: skip
_MESSAGE_KEYS = frozenset({"role", "content", "name", "tool_calls", "tool_call_id"})


@dataclass(frozen=True, slots=True)
class FieldNames:
    """Core's field names -> the body's, by prefix ("history[0]" -> "messages[1]")."""

    prefixes: tuple[tuple[str, str], ...]

    def translate(self, core_field: str) -> str:
        for core, wire in self.prefixes:
            rest = core_field.removeprefix(core)
            if rest != core_field and rest[:1] in ("", ".", "["):
                return wire + rest
        return core_field


@dataclass(frozen=True, slots=True)
class OpenAIRequest:
    kind: Kind
    raw: RawRequest
    names: FieldNames
    model: str | None
    stream: bool
    include_usage: bool
    user: str | None
    tool_calls: bool = False  # the answer is read as tool calls (structured.py)


def parse_request(kind: Kind, body: dict[str, Any], limits: OpenAISettings) -> OpenAIRequest:
    """The request, or InvalidRequest naming the first field of `body` that is wrong."""
    for key in body:
        if key not in _KNOWN[kind]:
            raise invalid(key, f"{key}: unrecognized request argument")
    _refuse_unsupported(kind, body)
    stream = _optional(body, "stream", bool) or False
    include_usage = _stream_options(body, stream)
    n = _optional(body, "n", int)
    if n is not None and n != 1:
        raise invalid("n", f"n: only 1 choice per request is supported, got {n}")
    params, names = _params(kind, body)
    tool_calls = False
    if kind == "chat":
        raw, message_names = _conversation(body, params, limits)
        names = names + message_names
        structure = parse_structure(body)
        tool_calls = structure.tool_calls
        if structure.constraint is not None:  # tools reach the model in core/prompt.py
            raw = replace(raw, constraint=structure.constraint)
    else:
        raw = _completion_prompt(body, params, limits)
    return OpenAIRequest(
        kind=kind,
        raw=raw,
        names=FieldNames(names),
        model=_optional(body, "model", str),
        stream=stream,
        include_usage=include_usage,
        user=_optional(body, "user", str),
        tool_calls=tool_calls,
    )


# -- fields refused unless they change nothing -----------------------------------------


def _refuse_unsupported(kind: Kind, body: Mapping[str, Any]) -> None:
    for name in ("presence_penalty", "frequency_penalty"):
        value = _optional(body, name, float)
        if value:
            _unsupported(name, "is not supported (only 0); use repetition_penalty")
    if _optional(body, "logit_bias", dict):
        _unsupported("logit_bias", "is not supported")
    if kind == "chat":
        if _optional(body, "logprobs", bool):
            _unsupported("logprobs", "is not supported")
        if _optional(body, "top_logprobs", int):
            _unsupported("top_logprobs", "is not supported")
        # The deprecated spelling of tools; `tools` and `tool_choice` are (structured.py).
        if _optional(body, "functions", list):
            _unsupported("functions", "are not supported; use tools")
        if body.get("function_call") is not None:
            _unsupported("function_call", "is not supported; use tool_choice")
    else:
        if body.get("logprobs") is not None:
            _unsupported("logprobs", "is not supported")
        if _optional(body, "echo", bool):
            _unsupported("echo", "is not supported")
        if _optional(body, "suffix", str):
            _unsupported("suffix", "is not supported")
        best_of = _optional(body, "best_of", int)
        if best_of is not None and best_of != 1:
            _unsupported("best_of", "only 1 is supported")


def _unsupported(name: str, why: str) -> None:
    raise invalid(name, f"{name}: {why}")


def _stream_options(body: Mapping[str, Any], stream: bool) -> bool:
    options = _optional(body, "stream_options", dict)
    if options is None:
        return False
    if not stream:
        raise invalid("stream_options", "stream_options: only allowed when stream is true")
    for key in options:
        if key != "include_usage":
            raise invalid(f"stream_options.{key}", f"stream_options.{key}: is not supported")
    return bool(_optional(options, "include_usage", bool, "stream_options.include_usage"))


# -- sampling parameters ----------------------------------------------------------------


def _params(kind: Kind, body: Mapping[str, Any]) -> tuple[RawParams, tuple[tuple[str, str], ...]]:
    max_tokens = _optional(body, "max_tokens", int)
    max_completion = _optional(body, "max_completion_tokens", int) if kind == "chat" else None
    limit_name = "max_tokens"
    if max_completion is not None:
        if max_tokens is not None and max_tokens != max_completion:
            raise invalid(
                "max_tokens", "max_tokens: differs from max_completion_tokens; set only one"
            )
        max_tokens, limit_name = max_completion, "max_completion_tokens"
    stops, stop_names = _stop(body.get("stop"))
    params = RawParams(
        max_new_tokens=max_tokens,
        temperature=_optional(body, "temperature", float),
        top_k=_optional(body, "top_k", int),
        top_p=_optional(body, "top_p", float),
        repetition_penalty=_optional(body, "repetition_penalty", float),
        stop_sequences=stops,
        seed=_optional(body, "seed", int),
    )
    names = (
        *stop_names,
        ("params.max_new_tokens", limit_name),
        ("params.temperature", "temperature"),
        ("params.top_k", "top_k"),
        ("params.top_p", "top_p"),
        ("params.repetition_penalty", "repetition_penalty"),
        ("params.seed", "seed"),
    )
    return params, names


def _stop(value: object) -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    if value is None:
        return (), ()
    if isinstance(value, str):
        return (value,), (("params.stop_sequences[0]", "stop"), ("params.stop_sequences", "stop"))
    if isinstance(value, list):
        for index, item in enumerate(value):
            if not isinstance(item, str):
                raise invalid(f"stop[{index}]", f"stop[{index}]: must be a string")
        return tuple(value), (("params.stop_sequences", "stop"),)
    raise invalid("stop", "stop: must be a string or a list of strings")


# -- the prompt -------------------------------------------------------------------------


def _conversation(
    body: Mapping[str, Any], params: RawParams, limits: OpenAISettings
) -> tuple[RawRequest, tuple[tuple[str, str], ...]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("messages", "messages: must be a non-empty list of messages")
    if len(messages) > limits.max_messages:
        raise invalid(
            "messages",
            f"messages: at most {limits.max_messages} messages, got {len(messages)}",
        )
    turns = [_message(index, message) for index, message in enumerate(messages)]
    _check_length("messages", sum(len(content) for _, content in turns), limits)
    last = len(turns) - 1
    if turns[last][0] != "user":
        raise invalid(
            f"messages[{last}].role",
            f"messages[{last}].role: the last message must be the user's, got {turns[last][0]!r}",
        )
    first = 1 if turns[0][0] == "system" and last > 0 else 0
    system_prompt = turns[0][1] if first else ""
    names: list[tuple[str, str]] = [("system_prompt", "messages[0].content")]
    names.extend((f"history[{k}]", f"messages[{k + first}]") for k in range(last - first))
    names.append(("history", "messages"))
    raw = RawRequest(
        user_prompt=turns[last][1],
        system_prompt=system_prompt,
        history=tuple(turns[first:last]),
        params=params,
        prompt_field=f"messages[{last}].content",
    )
    return raw, tuple(names)


def _message(index: int, message: object) -> tuple[str, str]:
    where = f"messages[{index}]"
    if not isinstance(message, dict):
        raise invalid(where, f"{where}: must be an object with role and content")
    for key in message:
        if key not in _MESSAGE_KEYS:
            raise invalid(f"{where}.{key}", f"{where}.{key}: is not supported")
    role_value = message.get("role")
    role = _ROLES.get(role_value) if isinstance(role_value, str) else None
    if role is None:
        raise invalid(
            f"{where}.role",
            f"{where}.role: must be one of {', '.join(_ROLES)}, got {role_value!r}",
        )
    content = message.get("content")
    if role_value == "tool":
        if not isinstance(message.get("tool_call_id"), str):
            raise invalid(f"{where}.tool_call_id", f"{where}.tool_call_id: must be a string")
        return role, fmt.tool_response_text(_content(f"{where}.content", content))
    if role == "assistant" and message.get("tool_calls") is not None:
        calls, _ = assistant_calls_text(where, message["tool_calls"])
        text = "" if content is None else _content(f"{where}.content", content)
        return role, f"{text}\n{calls}" if text else calls
    if content is None and role == "assistant":
        return role, ""
    return role, _content(f"{where}.content", content)


def _content(where: str, content: object) -> str:
    """A string, or a list of text parts joined (as OpenAI joins them)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise invalid(where, f"{where}: must be a string or a list of text parts")
    texts: list[str] = []
    for index, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") != "text":
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise invalid(
                f"{where}[{index}].type",
                f"{where}[{index}].type: only text parts are supported, got {kind!r}",
            )
        text = part.get("text")
        if not isinstance(text, str):
            raise invalid(f"{where}[{index}].text", f"{where}[{index}].text: must be a string")
        texts.append(text)
    return "\n".join(texts)


def _completion_prompt(
    body: Mapping[str, Any], params: RawParams, limits: OpenAISettings
) -> RawRequest:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]  # what some clients send for one prompt
    if not isinstance(prompt, str):
        raise invalid("prompt", "prompt: must be a string (one prompt per request)")
    _check_length("prompt", len(prompt), limits)
    return RawRequest(user_prompt=prompt, params=params, prompt_field="prompt", chat_template=False)


def _check_length(field: str, characters: int, limits: OpenAISettings) -> None:
    if characters > limits.max_prompt_chars:
        raise invalid(
            field,
            f"{field}: the prompt is {characters} characters; at most "
            f"{limits.max_prompt_chars} are accepted",
        )


def invalid(field: str, message: str) -> InvalidRequest:
    """`message` reads "<field>: <reason>", as the client will see it."""
    return InvalidRequest(field, message.removeprefix(f"{field}: "))


# -- JSON types -------------------------------------------------------------------------

_TYPE_WORDS = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
               dict: "an object", list: "a list"}  # fmt: skip


def _optional(
    body: Mapping[str, Any], key: str, kind: type[T], name: str | None = None
) -> T | None:
    """body[key] when present and not null, checked against `kind` (JSON's notion:
    an integer is a number, a boolean is neither)."""
    value = body.get(key)
    if value is None:
        return None
    ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if kind is float and ok and not math.isfinite(value):
        ok = False
    if not ok:
        field = name or key
        raise InvalidRequest(field, f"must be {_TYPE_WORDS[kind]}, got {value!r}")
    return value  # type: ignore[return-value]
