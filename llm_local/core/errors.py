"""Errors that core raises and transports map to wire statuses.

InvalidRequest -> INVALID_ARGUMENT, CapacityExceeded -> RESOURCE_EXHAUSTED,
NotReady -> UNAVAILABLE. Each message is meant to be shown to the caller as is.
"""

from __future__ import annotations


class InvalidRequest(Exception):
    """The request is malformed; `field` is its proto-style path, e.g. ``params.top_p``."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(field, message)
        self.field = field
        self.message = message

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


class CapacityExceeded(Exception):
    """No generation slot is free and the wait queue is full (or the wait timed out)."""


class NotReady(Exception):
    """The model is not serving: it is loading, it failed to load, or the server is stopping."""
