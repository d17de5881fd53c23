"""Tool declarations in OpenAI's shape -> an OutputConstraint, pure; both transports take
them (the OpenAI API as `tools`/`tool_choice`/`parallel_tool_calls`, gRPC inside
`GenerationParams.engine_specific_params`). Errors name the field as the caller spells it.
"""

from __future__ import annotations

from llm_local.core.errors import InvalidRequest
from llm_local.core.structured import tools as fmt
from llm_local.core.structured.constraint import (
    OutputConstraint,
    ToolMode,
    ToolSpec,
    canonical_json,
)

_FUNCTION_KEYS = frozenset({"name", "description", "parameters", "strict"})
EMPTY_PARAMETERS = {"type": "object", "properties": {}}


def tool_constraint(
    tools: tuple[ToolSpec, ...],
    choice: object,
    parallel: object,
    field: str,
    prefix: str,
) -> OutputConstraint | None:
    """The constraint of declared `tools` under `choice` (none / auto / required / a named
    function; absent = auto) and `parallel` (absent = true); None when nothing is asked.
    `prefix` goes before the sibling fields' names ("" or "params.engine_specific_params.")."""
    if parallel is None:
        parallel = True
    if not isinstance(parallel, bool):
        raise InvalidRequest(f"{prefix}parallel_tool_calls", f"must be a boolean, got {parallel!r}")
    if not tools:
        if choice not in (None, "none"):
            raise InvalidRequest(f"{prefix}tool_choice", "needs tools: no tools were given")
        return None
    mode, chosen = _tool_choice(choice, tools, f"{prefix}tool_choice")
    if mode is None:
        return None
    # A named function is one call of it, as OpenAI answers a named tool_choice.
    named = isinstance(choice, dict)
    return OutputConstraint(field=field, tools=chosen, mode=mode, parallel=parallel and not named)


def declared_tools(value: object, field: str) -> tuple[ToolSpec, ...]:
    """OpenAI's `tools` list (functions with JSON Schema parameters), checked; errors
    name `field` and the path inside it."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise InvalidRequest(field, "must be a list of tools")
    specs: list[ToolSpec] = []
    for index, tool in enumerate(value):
        where = f"{field}[{index}]"
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise InvalidRequest(f"{where}.type", "only 'function' tools are supported")
        for key in tool:
            if key not in ("type", "function"):
                raise InvalidRequest(f"{where}.{key}", "is not supported")
        function = tool.get("function")
        if not isinstance(function, dict):
            raise InvalidRequest(f"{where}.function", "must be an object")
        for key in function:
            if key not in _FUNCTION_KEYS:
                raise InvalidRequest(f"{where}.function.{key}", "is not supported")
        name = function.get("name")
        if not isinstance(name, str) or not fmt.NAME_PATTERN.match(name):
            raise InvalidRequest(
                f"{where}.function.name", "must be 1-64 characters of a-z, A-Z, 0-9, _ and -"
            )
        if any(spec.name == name for spec in specs):
            raise InvalidRequest(f"{where}.function.name", f"{name!r} is declared twice")
        description = function.get("description", "")
        if not isinstance(description, str):
            raise InvalidRequest(f"{where}.function.description", "must be a string")
        parameters = function.get("parameters", EMPTY_PARAMETERS)
        if not isinstance(parameters, dict):
            raise InvalidRequest(f"{where}.function.parameters", "must be a JSON Schema object")
        specs.append(ToolSpec(name, description, canonical_json(parameters)))
    return tuple(specs)


def _tool_choice(
    choice: object, tools: tuple[ToolSpec, ...], field: str
) -> tuple[ToolMode | None, tuple[ToolSpec, ...]]:
    if choice is None or choice == "auto":
        return ToolMode.AUTO, tools
    if choice == "none":
        return None, ()
    if choice == "required":
        return ToolMode.REQUIRED, tools
    if isinstance(choice, dict) and choice.get("type") == "function":
        function = choice.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        for tool in tools:
            if tool.name == name:
                return ToolMode.REQUIRED, (tool,)
        raise InvalidRequest(f"{field}.function.name", f"names no tool given: {name!r}")
    raise InvalidRequest(
        field,
        "must be 'none', 'auto', 'required' or {'type': 'function', 'function': {'name': …}}",
    )
