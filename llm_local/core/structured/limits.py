"""Size and nesting limits on a constraint, pure: checked before any engine compiles it.

A schema's size is its canonical JSON text in bytes; its depth the deepest nesting of
objects and arrays in that text (a schema nested 1000 deep would recurse through every
compiler and validator that reads it).
"""

from __future__ import annotations

import re

from llm_local.core.errors import InvalidRequest
from llm_local.core.structured.constraint import OutputConstraint

_STRING = re.compile(r'"(?:\\.|[^"\\])*"')
_BRACKET = re.compile(r"[\[\]{}]")


def depth(text: str) -> int:
    """Nesting depth of a JSON text (a scalar is 0), read from its brackets outside strings."""
    level = deepest = 0
    for bracket in _BRACKET.findall(_STRING.sub("", text)):
        if bracket in "[{":
            level += 1
            deepest = max(deepest, level)
        else:
            level -= 1
    return deepest


def check_limits(
    constraint: OutputConstraint, *, max_schema_bytes: int, max_schema_depth: int, max_tools: int
) -> None:
    """Raise InvalidRequest naming the constraint's field when a limit is passed."""
    where = constraint.field
    if len(constraint.tools) > max_tools:
        raise InvalidRequest(
            where, f"at most {max_tools} tools (generation.max_tools), got {len(constraint.tools)}"
        )
    texts = [constraint.schema] if constraint.schema is not None else []
    texts.extend(tool.parameters for tool in constraint.tools)
    size = sum(len(text.encode("utf-8")) for text in texts)
    if size > max_schema_bytes:
        raise InvalidRequest(
            where,
            f"the schema is {size} bytes; at most {max_schema_bytes} are accepted "
            "(generation.max_schema_bytes)",
        )
    for text in texts:
        nesting = depth(text)
        if nesting > max_schema_depth:
            raise InvalidRequest(
                where,
                f"the schema nests {nesting} levels deep; at most {max_schema_depth} are "
                "accepted (generation.max_schema_depth)",
            )
