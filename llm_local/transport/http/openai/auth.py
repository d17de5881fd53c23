"""Bearer keys for /v1/*: compared in constant time, never logged."""

from __future__ import annotations

import hmac
from collections.abc import Sequence


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, or None."""
    if authorization is None:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def authorized(authorization: str | None, keys: Sequence[str]) -> bool:
    """True when no key is configured, or the header carries one of `keys`."""
    if not keys:
        return True
    token = bearer_token(authorization)
    if token is None:
        return False
    presented = token.encode()
    # Every key is compared (no early exit), so the time says nothing about which
    # key, or how much of one, matched.
    matches = [hmac.compare_digest(presented, key.encode()) for key in keys]
    return any(matches)
