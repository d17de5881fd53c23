"""Stop sequences over streamed text: cut before the first one, never send it.

Text arrives in pieces, so a stop may span pieces. The matcher holds back the longest
tail that is still the beginning of some stop, and releases it as soon as the next
piece shows that it is not (or at flush(), when generation ends without a stop).
Everything before the earliest occurrence of any stop is emitted; the stop and all
after it are dropped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class StopResult:
    emit: str  # text safe to send now
    stopped: bool  # a stop sequence matched: generation should end


class StopMatcher:
    def __init__(self, stop_sequences: Sequence[str]) -> None:
        if any(not stop for stop in stop_sequences):
            raise ValueError("stop sequences must not be empty")
        self._stops = tuple(dict.fromkeys(stop_sequences))
        self._held = ""
        self._stopped = False

    @property
    def stopped(self) -> bool:
        return self._stopped

    def feed(self, text: str) -> StopResult:
        if self._stopped:
            return StopResult("", True)
        if not self._stops:
            return StopResult(text, False)
        buffer = self._held + text
        # Positions before the held tail were already ruled out as stop starts, so the
        # earliest match in `buffer` is the earliest match in the whole text...
        earliest = self._earliest_match(buffer)
        # ... unless a stop still being spelled starts before it: with stops "a" and
        # "\naa", the text "\na" matches "a" at 1, yet "\naa" may still match at 0.
        undecided = len(buffer) - self._partial_match_length(buffer)
        if 0 <= earliest <= undecided:
            self._held = ""
            self._stopped = True
            return StopResult(buffer[:earliest], True)
        self._held = buffer[undecided:]
        return StopResult(buffer[:undecided], False)

    def flush(self) -> StopResult:
        """Release held-back text: generation ended. The held text may still hold a
        complete stop, kept back while a longer one starting earlier could match."""
        held, self._held = self._held, ""
        if self._stopped:
            return StopResult("", True)
        earliest = self._earliest_match(held)
        if earliest >= 0:
            self._stopped = True
            return StopResult(held[:earliest], True)
        return StopResult(held, False)

    def _earliest_match(self, buffer: str) -> int:
        """Where the first complete stop in `buffer` starts, or -1."""
        return min(
            (index for stop in self._stops if (index := buffer.find(stop)) >= 0),
            default=-1,
        )

    def _partial_match_length(self, buffer: str) -> int:
        """Length of the longest tail of `buffer` that is a proper prefix of a stop."""
        longest = 0
        for stop in self._stops:
            for length in range(min(len(stop) - 1, len(buffer)), longest, -1):
                if buffer.endswith(stop[:length]):
                    longest = length
                    break
        return longest
