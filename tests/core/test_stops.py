from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llm_local.core.stops import StopMatcher, StopResult


def run(matcher: StopMatcher, pieces: list[str]) -> tuple[str, bool]:
    """What a client would receive, and whether the matcher stopped."""
    out: list[str] = []
    for piece in pieces:
        result = matcher.feed(piece)
        out.append(result.emit)
        if result.stopped:
            return "".join(out), True
    held = matcher.flush()
    out.append(held.emit)
    return "".join(out), held.stopped


def split(text: str, cuts: list[int]) -> list[str]:
    points = sorted({min(cut, len(text)) for cut in cuts})
    bounds = [0, *points, len(text)]
    return [text[start:end] for start, end in itertools.pairwise(bounds)]


def test_stop_inside_one_piece_cuts_before_it() -> None:
    matcher = StopMatcher(["\nUser:"])
    assert matcher.feed("Paris.\nUser: more") == StopResult("Paris.", True)
    assert matcher.feed("ignored") == StopResult("", True)
    assert matcher.flush() == StopResult("", True)


def test_possible_stop_start_is_held_then_released() -> None:
    matcher = StopMatcher(["END"])
    assert matcher.feed("the EN") == StopResult("the ", False)
    assert matcher.feed("chilada") == StopResult("ENchilada", False)


def test_stop_spanning_pieces_is_never_emitted() -> None:
    matcher = StopMatcher(["<stop>"])
    assert run(matcher, ["abc<", "st", "o", "p>tail"]) == ("abc", True)


def test_held_text_is_flushed_when_generation_ends() -> None:
    matcher = StopMatcher(["###"])
    assert matcher.feed("done ##") == StopResult("done ", False)
    assert matcher.flush() == StopResult("##", False)


def test_a_longer_stop_starting_earlier_wins_over_a_complete_later_one() -> None:
    # "a" is complete at 1 while "\naa" may still match at 0: hold, then decide.
    assert run(StopMatcher(["a", "\naa"]), ["\na", "a"]) == ("", True)
    assert run(StopMatcher(["a", "\naa"]), ["\na", "b"]) == ("\n", True)
    # Generation ends while undecided: the complete stop in the held text still cuts.
    assert run(StopMatcher(["a", "\naa"]), ["\na"]) == ("\n", True)


def test_earliest_of_several_stops_wins() -> None:
    matcher = StopMatcher(["world", "lo w"])
    assert run(matcher, ["hel", "lo world"]) == ("hel", True)


def test_no_stops_passes_text_through() -> None:
    matcher = StopMatcher([])
    assert matcher.feed("anything") == StopResult("anything", False)


def test_empty_stop_is_refused() -> None:
    with pytest.raises(ValueError, match="empty"):
        StopMatcher(["ok", ""])


# A small alphabet makes overlapping and repeated partial matches common.
small_text = st.text(alphabet="abc\n", max_size=30)
stops = st.lists(st.text(alphabet="abc\n", min_size=1, max_size=4), min_size=1, max_size=3)
cuts = st.lists(st.integers(min_value=0, max_value=40), max_size=10)


@given(text=small_text, stop_sequences=stops, cut_points=cuts)
def test_output_is_the_text_before_the_first_stop_however_split(
    text: str, stop_sequences: list[str], cut_points: list[int]
) -> None:
    found = [index for stop in stop_sequences if (index := text.find(stop)) >= 0]
    expected = (text[: min(found)], True) if found else (text, False)
    assert run(StopMatcher(stop_sequences), split(text, cut_points)) == expected


@given(before=small_text, stop=st.text(min_size=1, max_size=6), after=st.text(), cut_points=cuts)
def test_any_unicode_stop_cuts_there(
    before: str, stop: str, after: str, cut_points: list[int]
) -> None:
    text = before + stop + after
    emitted, stopped = run(StopMatcher([stop]), split(text, cut_points))
    assert stopped
    assert emitted == text[: text.find(stop)]
