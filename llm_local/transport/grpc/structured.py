"""`GenerationParams.engine_specific_params` (a google.protobuf.Struct) -> core's
OutputConstraint, pure. The keys (README, "Structured output over gRPC"):

- ``json_schema``: a JSON Schema (a Struct); the answer's tokens are one JSON value
  matching it;
- ``tools``: a list of tools in OpenAI's shape (``{"type": "function", "function":
  {"name", "description", "parameters"}}``), with ``tool_choice`` (``"none"``,
  ``"auto"`` (default), ``"required"`` or ``{"type": "function", "function": {"name":
  …}}``) and ``parallel_tool_calls`` (default true); the answer's tokens are text or
  tool-call blocks (core/structured/tools.py).

Any other key is INVALID_ARGUMENT naming it: an option silently ignored is a bug report
waiting to happen. A Struct holds every number as a double; a whole number is read back
as an integer (``maxLength: 20.0`` is ``20``), which JSON Schema treats as the same value.
"""

from __future__ import annotations

import re
from typing import Any

from google.protobuf import json_format

from llm_local.core.errors import InvalidRequest
from llm_local.core.structured.constraint import OutputConstraint, canonical_json
from llm_local.core.structured.declarations import declared_tools, tool_constraint
from llm_local.proto.sentiric.llm.v1 import llama_pb2

PREFIX = "params.engine_specific_params."
KEYS = ("json_schema", "tools", "tool_choice", "parallel_tool_calls")
_PLAIN_KEY = re.compile(r"[a-z_][a-z0-9_]*")


def engine_constraint(params: llama_pb2.GenerationParams) -> OutputConstraint | None:
    if not params.HasField("engine_specific_params"):
        return None
    values = _whole_numbers(json_format.MessageToDict(params.engine_specific_params))
    assert isinstance(values, dict)
    for key in values:
        if key not in KEYS:
            # A key that is no plain name (empty, spaces, punctuation) would make the field
            # path unreadable: the path then stops at the Struct and the message quotes it.
            field = f"{PREFIX}{key}" if _PLAIN_KEY.fullmatch(key) else PREFIX.rstrip(".")
            raise InvalidRequest(
                field, f"unknown key {key!r}; the keys this server reads: {', '.join(KEYS)}"
            )
    tools = declared_tools(values.get("tools"), f"{PREFIX}tools")
    constraint = tool_constraint(
        tools,
        values.get("tool_choice"),
        values.get("parallel_tool_calls"),
        f"{PREFIX}tools",
        PREFIX,
    )
    schema = values.get("json_schema")
    if schema is None:
        return constraint
    if not isinstance(schema, dict):
        raise InvalidRequest(f"{PREFIX}json_schema", "must be a JSON Schema object (a Struct)")
    if constraint is not None:
        raise InvalidRequest(
            f"{PREFIX}json_schema", "cannot be combined with tools (unless tool_choice is 'none')"
        )
    return OutputConstraint(field=f"{PREFIX}json_schema", schema=canonical_json(schema))


def _whole_numbers(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {key: _whole_numbers(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_whole_numbers(item) for item in value]
    return value
