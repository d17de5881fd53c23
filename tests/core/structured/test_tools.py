"""The tool-call text format: calls read back whole or streamed, identically."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from llm_local.core.structured import tools as fmt

CALLS = (("get_weather", '{"city": "Paris"}'), ("get_time", "{}"))


def test_calls_read_back_with_their_names_and_arguments() -> None:
    answer = fmt.read_answer(fmt.calls_text(CALLS))
    assert answer.calls == CALLS
    assert answer.text == ""


def test_text_that_does_not_start_a_call_is_text() -> None:
    answer = fmt.read_answer("It is sunny <maybe>.")
    assert answer == fmt.ReadAnswer("It is sunny <maybe>.", ())


def test_arguments_holding_the_ending_inside_a_string_stay_whole() -> None:
    arguments = '{"note": "}\\n</tool_call>"}'  # an escaped newline: not the real ending
    assert fmt.read_answer(fmt.calls_text([("f", arguments)])).calls == (("f", arguments),)


def test_an_answer_cut_short_keeps_the_arguments_so_far() -> None:
    whole = fmt.calls_text(CALLS[:1])
    assert fmt.read_answer(whole[:-5]).calls == CALLS[:1]  # in the ending: all there
    assert fmt.read_answer(whole[:-20]).calls == (("get_weather", '{"city": "P'),)


@given(st.lists(st.integers(min_value=1, max_value=7), min_size=1, max_size=40))
def test_streamed_pieces_reassemble_to_the_whole_answer(sizes: list[int]) -> None:
    text = fmt.calls_text(CALLS)
    reader = fmt.ToolCallReader()
    parts: list[fmt.StreamPart] = []
    position = 0
    for size in sizes * 20:
        if position >= len(text):
            break
        parts.extend(reader.feed(text[position : position + size]))
        position += size
    parts.extend(reader.feed(text[position:]))
    parts.extend(reader.finish())
    names = [part.name for part in parts if isinstance(part, fmt.CallStarted)]
    arguments = ["", ""]
    for part in parts:
        if isinstance(part, fmt.Arguments):
            arguments[part.index] += part.delta
    assert list(zip(names, arguments, strict=True)) == list(CALLS)
