"""Limits on a constraint: size, nesting, tools; each refusal names the field and setting."""

from __future__ import annotations

import pytest

from llm_local.core.errors import InvalidRequest
from llm_local.core.structured.constraint import OutputConstraint, ToolSpec, canonical_json
from llm_local.core.structured.limits import check_limits, depth


def nested(levels: int) -> dict[str, object]:
    schema: dict[str, object] = {"type": "string"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


def test_depth_counts_brackets_outside_strings() -> None:
    assert depth('{"a": [1, {"b": "[[[{"}]}') == 3
    assert depth('"{"') == 0
    assert depth('{"x": "a\\"[["}') == 1


@pytest.mark.parametrize(
    ("constraint", "setting"),
    [
        (OutputConstraint("response_format", schema=canonical_json(nested(10))), "depth"),
        (
            OutputConstraint("response_format", schema=canonical_json({"enum": ["x" * 1200]})),
            "bytes",
        ),
        (
            OutputConstraint("tools", tools=tuple(ToolSpec(f"f{i}", "", "{}") for i in range(5))),
            "tools",
        ),
    ],
)
def test_a_constraint_past_a_limit_is_refused_naming_it(
    constraint: OutputConstraint, setting: str
) -> None:
    with pytest.raises(InvalidRequest) as caught:
        check_limits(constraint, max_schema_bytes=1000, max_schema_depth=16, max_tools=4)
    assert caught.value.field == constraint.field
    assert f"generation.max_{'schema_' if setting != 'tools' else ''}{setting}" in str(caught.value)


def test_a_constraint_within_the_limits_passes() -> None:
    constraint = OutputConstraint("response_format", schema=canonical_json(nested(3)))
    check_limits(constraint, max_schema_bytes=1000, max_schema_depth=16, max_tools=4)
