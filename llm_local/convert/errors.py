"""The one error a conversion reports: what failed and why, in one line."""

from __future__ import annotations


class ConversionError(Exception):
    """Conversion failed; str() is a single line fit for `llm-local convert: error: ...`."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message: library errors run to many lines."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
