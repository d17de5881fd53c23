"""Settings problems, collected and reported together rather than one per start-up."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


class _Missing:
    def __repr__(self) -> str:
        return "(missing)"


MISSING: object = _Missing()


@dataclass(frozen=True, slots=True)
class Problem:
    """One bad setting: its dotted key, the value found and what would be allowed."""

    key: str
    value: object
    allowed: str
    source: str | None = None  # the environment variable that set it, when one did

    def __str__(self) -> str:
        origin = f" (from {self.source})" if self.source else ""
        return f"{self.key} = {self.value!r}{origin}: {self.allowed}"


class SettingsError(Exception):
    """The settings are unusable; `problems` lists every reason, not just the first."""

    def __init__(self, problems: Iterable[Problem]) -> None:
        self.problems: list[Problem] = list(problems)
        super().__init__(self.problems)

    @property
    def keys(self) -> list[str]:
        return [problem.key for problem in self.problems]

    def __str__(self) -> str:
        count = len(self.problems)
        header = f"invalid settings ({count} problem{'s' if count != 1 else ''}):"
        return "\n".join([header, *(f"  {problem}" for problem in self.problems)])
