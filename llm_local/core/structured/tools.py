"""The tool-call text format, pure: how tools are shown to the model, how its calls read.

A model that calls tools answers with one block per call, blocks separated by a newline::

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

(the Hermes format, which many open models were trained on). The grammar fixes this
layout exactly (backends/shared/grammar.py): keys in this order, ", " and ": " as
separators, no other whitespace outside strings, so that a call's arguments are the text
between the fixed header and the fixed ending, streamed or not. In `auto` mode the answer
is either such blocks or text that does not start with "<".

A tool result in the conversation reaches the model as a user turn holding
``<tool_response>…</tool_response>``; an assistant turn that called tools as its blocks.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from llm_local.core.structured.constraint import OutputConstraint, ToolMode

CALL_OPEN = "<tool_call>\n"
CALL_CLOSE = "\n</tool_call>"
CALL_SEPARATOR = "\n"
ITEM_SEPARATOR = ", "
KEY_SEPARATOR = ": "
ARGUMENTS_END = "}" + CALL_CLOSE  # the call object's closing brace, then the block's end
TEXT_FIRST_CHARACTER = "[^<]"  # what a text answer starts with in auto mode (a regex class)
_HEADER = re.compile(r'<tool_call>\n\{"name": "([^"\\]*)", "arguments": ')
NAME_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names


def call_text(name: str, arguments: str) -> str:
    """One call block, as the grammar makes the model write it."""
    return f'{CALL_OPEN}{{"name": "{name}", "arguments": {arguments}}}{CALL_CLOSE}'


def calls_text(calls: Iterable[tuple[str, str]]) -> str:
    return CALL_SEPARATOR.join(call_text(name, arguments) for name, arguments in calls)


def tool_response_text(content: str) -> str:
    return f"<tool_response>\n{content}\n</tool_response>"


def tools_prompt(constraint: OutputConstraint) -> str:
    """The default rendering of the tools, appended to the system prompt."""
    lines = [
        "You can call the following tools. Each is a function with a JSON schema for its "
        "arguments:",
        "<tools>",
    ]
    for tool in constraint.tools:
        function = {"name": tool.name, "description": tool.description}
        function["parameters"] = tool.parameters_schema()  # type: ignore[assignment]
        lines.append(json.dumps({"type": "function", "function": function}))
    lines.append("</tools>")
    lines.append("To call a tool, answer with a block like this for each call, and nothing else:")
    lines.append(call_text("<function-name>", "<arguments-as-a-json-object>"))
    if constraint.mode is ToolMode.AUTO:
        lines.append("If no tool is needed, answer the user in plain text.")
    elif len(constraint.tools) == 1:
        lines.append(f"You must call {constraint.tools[0].name} now.")
    else:
        lines.append("You must call a tool now.")
    return "\n".join(lines)


# -- reading calls back ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Text:
    text: str


@dataclass(frozen=True, slots=True)
class CallStarted:
    index: int
    name: str


@dataclass(frozen=True, slots=True)
class Arguments:
    index: int
    delta: str


StreamPart = Text | CallStarted | Arguments


class ToolCallReader:
    """Text in, as the model writes it; text or tool calls out, incrementally.

    The first character decides: "<" starts tool calls (the grammar allows nothing else
    there), anything else is a text answer. Arguments are passed on as they come, all but
    the last few characters, which might be the call's ending.
    """

    def __init__(self) -> None:
        self._buffer = ""
        self._mode: str | None = None  # None (undecided), "text", "header", "arguments"
        self._calls = 0

    @property
    def calls(self) -> int:
        return self._calls

    def feed(self, text: str) -> Iterator[StreamPart]:
        self._buffer += text
        while self._buffer:
            if self._mode is None:
                self._mode = "header" if self._buffer.startswith("<") else "text"
            if self._mode == "text":
                text, self._buffer = self._buffer, ""
                yield Text(text)
                return
            if self._mode == "header":
                if self._calls and self._buffer.startswith(CALL_SEPARATOR):
                    self._buffer = self._buffer[len(CALL_SEPARATOR) :]
                    continue
                match = _HEADER.match(self._buffer)
                if match is None:
                    return  # not all of the header yet
                self._buffer = self._buffer[match.end() :]
                self._mode = "arguments"
                self._calls += 1
                yield CallStarted(self._calls - 1, match.group(1))
                continue
            end = self._buffer.find(ARGUMENTS_END)
            if end >= 0:
                if end:
                    yield Arguments(self._calls - 1, self._buffer[:end])
                self._buffer = self._buffer[end + len(ARGUMENTS_END) :]
                self._mode = "header"
                continue
            ready = len(self._buffer) - (len(ARGUMENTS_END) - 1)
            if ready > 0:
                yield Arguments(self._calls - 1, self._buffer[:ready])
                self._buffer = self._buffer[ready:]
            return

    def finish(self) -> Iterator[StreamPart]:
        """What is held back at the end (an answer cut short mid-call)."""
        rest, self._buffer = self._buffer, ""
        if rest and self._mode == "arguments":
            # Compact JSON holds no newline: one here is the call's ending, cut short.
            ending = rest.find(ARGUMENTS_END[:2])
            if ending >= 0:
                rest = rest[:ending]
            if rest:
                yield Arguments(self._calls - 1, rest)
        elif rest and self._mode == "text":
            yield Text(rest)


@dataclass(frozen=True, slots=True)
class ReadAnswer:
    text: str
    calls: tuple[tuple[str, str], ...]  # (name, arguments as JSON text)


def read_answer(text: str) -> ReadAnswer:
    """The whole answer: its text, or its tool calls (read as the stream reads them)."""
    reader = ToolCallReader()
    texts: list[str] = []
    names: list[str] = []
    arguments: list[list[str]] = []
    for part in (*reader.feed(text), *reader.finish()):
        if isinstance(part, Text):
            texts.append(part.text)
        elif isinstance(part, CallStarted):
            names.append(part.name)
            arguments.append([])
        else:
            arguments[part.index].append(part.delta)
    calls = tuple((name, "".join(parts)) for name, parts in zip(names, arguments, strict=True))
    return ReadAnswer("".join(texts), calls)
