"""The constraint a request carries: a JSON schema for the whole answer, or a tool set.

Frozen and hashable (it rides on `SamplingOptions`), with every schema held as canonical
JSON text, so that equal constraints compare equal and a backend can cache one compiled
grammar per constraint.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass
from typing import Any, Protocol

# Where a request for structure can be served (the others refuse it, naming these).
STRUCTURED_OUTPUT_BACKENDS = ("llama_cpp", "transformers")


class ToolMode(enum.StrEnum):
    AUTO = "auto"  # text or tool calls, the model chooses
    REQUIRED = "required"  # at least one tool call (or the named one)


@dataclass(frozen=True, slots=True)
class ToolSpec:
    name: str
    description: str
    parameters: str  # canonical JSON text of the parameters' JSON schema

    def parameters_schema(self) -> dict[str, Any]:
        value = json.loads(self.parameters)
        assert isinstance(value, dict)
        return value


@dataclass(frozen=True, slots=True)
class OutputConstraint:
    """What the answer must be. `schema` set: one JSON value matching it. `tools` set: tool
    calls in the format of structured/tools.py (and, in AUTO mode, text instead).

    `field` is the request's field that asked (its wire name: ``response_format``,
    ``tools``, ``params.engine_specific_params.json_schema``): refusals name it.
    """

    field: str
    schema: str | None = None  # canonical JSON text
    tools: tuple[ToolSpec, ...] = ()
    mode: ToolMode = ToolMode.REQUIRED
    parallel: bool = True  # several tool calls in one answer

    @property
    def is_tool_call(self) -> bool:
        return bool(self.tools)


def canonical_json(value: object) -> str:
    """One text per JSON value: the cache key of its grammar."""
    return json.dumps(value, sort_keys=False, separators=(",", ":"), ensure_ascii=False)


class ConstraintChecker(Protocol):
    """A backend's grammar engine, as core sees it: can it enforce this constraint?"""

    def refusal(self, constraint: OutputConstraint) -> str | None:
        """None when it can; else why not, naming the schema feature it cannot enforce."""
        ...

    def is_compiled(self, constraint: OutputConstraint) -> bool:
        """Whether `refusal` answers from what it compiled before (microseconds); False:
        it compiles first (milliseconds, up to ~80 ms for a large schema)."""
        ...
