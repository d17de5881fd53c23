"""OpenAI's structured-output fields -> core's OutputConstraint, pure.

- ``response_format``: ``{"type": "text"}`` (nothing), ``{"type": "json_object"}`` (one
  JSON object), ``{"type": "json_schema", "json_schema": {"name", "schema", "strict",
  "description"}}`` (a value matching the schema; enforced whether ``strict`` is true or
  not: the grammar cannot be half strict).
- ``tools`` (functions with JSON Schema parameters), ``tool_choice`` (``none``, ``auto``,
  ``required``, ``{"type": "function", "function": {"name": …}}``: exactly one call of it),
  ``parallel_tool_calls`` (false: exactly one call).
  The tools reach the model through core/prompt.py (the chat template's tools section, or
  the default rendering in the system prompt); ``none`` leaves them out, the answer free.
- In the conversation: an assistant message's ``tool_calls`` and a ``role: "tool"``
  message (its ``tool_call_id`` checked against the calls before it) are rendered in the
  same text format the model answers in.

Combining tools with a JSON ``response_format`` is refused (400): the answer is one or
the other here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from llm_local.core.errors import InvalidRequest
from llm_local.core.structured import tools as fmt
from llm_local.core.structured.constraint import OutputConstraint, canonical_json
from llm_local.core.structured.declarations import declared_tools, tool_constraint

_JSON_SCHEMA_KEYS = frozenset({"name", "schema", "strict", "description"})


@dataclass(frozen=True, slots=True)
class Structure:
    constraint: OutputConstraint | None

    @property
    def tool_calls(self) -> bool:
        """Whether the answer is read as tool calls (or text, in auto mode)."""
        return self.constraint is not None and self.constraint.is_tool_call


def _invalid(field: str, reason: str) -> InvalidRequest:
    return InvalidRequest(field, reason)


def parse_structure(body: Mapping[str, Any]) -> Structure:
    response = _response_format(body.get("response_format"))
    tools = declared_tools(body.get("tools"), "tools")
    constraint = tool_constraint(
        tools, body.get("tool_choice"), body.get("parallel_tool_calls"), "tools", ""
    )
    if constraint is None:
        return Structure(response)
    if response is not None:
        raise _invalid(
            "response_format",
            "cannot be combined with tools (unless tool_choice is 'none'): the answer is "
            "either tool calls or JSON here",
        )
    return Structure(constraint)


def _response_format(value: object) -> OutputConstraint | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _invalid("response_format", "must be an object")
    kind = value.get("type")
    for key in value:
        if key not in ("type", "json_schema"):
            raise _invalid(f"response_format.{key}", "is not supported")
    if kind == "text":
        return None
    if kind == "json_object":
        return OutputConstraint(field="response_format", schema=canonical_json({"type": "object"}))
    if kind != "json_schema":
        raise _invalid(
            "response_format.type",
            f"must be 'text', 'json_object' or 'json_schema', got {kind!r}",
        )
    spec = value.get("json_schema")
    if not isinstance(spec, dict):
        raise _invalid("response_format.json_schema", "must be an object with a schema")
    for key in spec:
        if key not in _JSON_SCHEMA_KEYS:
            raise _invalid(f"response_format.json_schema.{key}", "is not supported")
    name = spec.get("name")
    if not isinstance(name, str) or not fmt.NAME_PATTERN.match(name):
        raise _invalid(
            "response_format.json_schema.name",
            "must be 1-64 characters of a-z, A-Z, 0-9, _ and -",
        )
    schema = spec.get("schema", {})
    if not isinstance(schema, dict):
        raise _invalid("response_format.json_schema.schema", "must be a JSON Schema object")
    strict = spec.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise _invalid("response_format.json_schema.strict", "must be a boolean")
    return OutputConstraint(
        field="response_format.json_schema.schema", schema=canonical_json(schema)
    )


# -- the conversation ---------------------------------------------------------------------


def assistant_calls_text(where: str, calls: object) -> tuple[str, list[str]]:
    """An assistant message's tool_calls as the model writes them, and their ids."""
    if not isinstance(calls, list) or not calls:
        raise _invalid(f"{where}.tool_calls", "must be a non-empty list")
    rendered: list[tuple[str, str]] = []
    ids: list[str] = []
    for index, call in enumerate(calls):
        at = f"{where}.tool_calls[{index}]"
        if not isinstance(call, dict):
            raise _invalid(at, "must be an object")
        function = call.get("function")
        if not isinstance(function, dict):
            raise _invalid(f"{at}.function", "must be an object with name and arguments")
        name = function.get("name")
        arguments = function.get("arguments", "{}")
        if not isinstance(name, str) or not fmt.NAME_PATTERN.match(name):
            raise _invalid(f"{at}.function.name", "must be a function name")
        if not isinstance(arguments, str):
            raise _invalid(f"{at}.function.arguments", "must be a string of JSON")
        try:
            compact = json.dumps(
                json.loads(arguments),
                separators=(fmt.ITEM_SEPARATOR, fmt.KEY_SEPARATOR),
                ensure_ascii=False,
            )
        except ValueError:
            raise _invalid(f"{at}.function.arguments", "is not valid JSON") from None
        rendered.append((name, compact))
        call_id = call.get("id")
        if isinstance(call_id, str):
            ids.append(call_id)
    return fmt.calls_text(rendered), ids
