"""JSONSchemaBench's own evaluation protocol, so that a coverage figure compares with the
paper's (arXiv 2501.10868) rather than with a protocol of ours.

The paper's figures come from its harness (github.com/epfl-dlab/jsonschemabench): each
schema is asked for with a system prompt, two worked examples from the same set (a schema
as the user's turn, a matching value as the assistant's) and the whole schema as the last
user turn (`core/messages.py`); greedy, at most 2,048 new tokens (`tests/configs/*.yaml`);
an answer counts when it parses and validates under Draft 2020-12 with formats asserted
(`core/evaluator.py`). The prompt and its examples are read from a checkout of that
harness, not copied here; the rule for judging is restated below, since its module needs
the harness's whole environment to import.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import json
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jsonschema

from llm_local.core.structured.constraint import OutputConstraint
from llm_local.core.types import ChatTurn, GenerationRequest, Role, SamplingOptions

Message = Mapping[str, Any]
MessagesFormatter = Callable[[str, Any], Sequence[Message]]

# The harness's configurations (tests/configs/*.yaml) all set max_tokens: 2048.
PAPER_MAX_TOKENS = 2048
HARNESS_MESSAGES = Path("core") / "messages.py"


def load_formatter(harness: Path) -> MessagesFormatter:
    """The harness's `few_shots_messages_formatter`, from its checkout: that file imports
    only the standard library, so it loads alone."""
    path = harness / HARNESS_MESSAGES
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: --harness takes a checkout of github.com/epfl-dlab/jsonschemabench"
        )
    spec = importlib.util.spec_from_file_location("jsonschemabench_messages", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    formatter: MessagesFormatter = module.few_shots_messages_formatter
    return formatter


def request_from_messages(
    messages: Sequence[Message], constraint: OutputConstraint, max_new_tokens: int
) -> GenerationRequest:
    """A chat the harness built (system, worked examples, the schema last) as our request."""
    if len(messages) < 2 or messages[0]["role"] != "system" or messages[-1]["role"] != "user":
        raise ValueError("expected a system turn first and a user turn last")
    history = tuple(ChatTurn(Role(turn["role"]), str(turn["content"])) for turn in messages[1:-1])
    return GenerationRequest(
        user_prompt=str(messages[-1]["content"]),
        system_prompt=str(messages[0]["content"]),
        history=history,
        max_new_tokens=max_new_tokens,
        sampling=SamplingOptions(constraint=constraint),
    )


def _format_checker() -> jsonschema.FormatChecker:
    checker = jsonschema.FormatChecker()
    # The harness adds these three to jsonschema's own (core/evaluator.py), checked with
    # the standard library, so they are asserted whatever optional packages are installed.
    checker.checks("ipv4", raises=ValueError)(ipaddress.IPv4Address)
    checker.checks("ipv6", raises=ValueError)(ipaddress.IPv6Address)
    checker.checks("uuid", raises=ValueError)(uuid.UUID)
    return checker


FORMAT_CHECKER = _format_checker()


def validates(answer: str, schema: Any) -> bool:
    """The harness's rule: the answer parses as JSON and validates under Draft 2020-12
    (whatever `$schema` names), formats asserted; a schema that is not itself valid
    Draft 2020-12 counts every answer as failing."""
    try:
        jsonschema.Draft202012Validator.check_schema(schema)
        value = json.loads(answer)
        jsonschema.Draft202012Validator(schema, format_checker=FORMAT_CHECKER).validate(value)
    # The harness counts any failure; a format check may raise more than ValueError.
    except Exception:
        return False
    return True
