"""The maximum connection age of the gRPC port, as policy: no I/O here (bridge.py acts).

A gateway keeps one HTTP/2 connection per replica for as long as it lives, so replicas
started after it (a scale-out, a rollout) get none of its calls. gRPC servers end that
with a maximum connection age (``GRPC_ARG_MAX_CONNECTION_AGE_MS`` in gRPC core,
``MaxConnectionAge`` in grpc-go): at the age the server sends GOAWAY, the client opens
its next calls on a new connection (resolving the service's name again, so it finds the
new replicas), and the calls already running get a grace period to finish
(``..._GRACE_MS``, ``MaxConnectionAgeGrace``) before the connection is closed under them.

The rules here are theirs:

- the age of each connection is spread by ±10 % (`JITTER`), so that connections opened
  together (every replica's, after a gateway restart) do not all turn at once;
- the GOAWAY names the last stream the server took (RFC 9113 6.8); a stream the client
  opened after it, before it read the GOAWAY, is refused (RST_STREAM REFUSED_STREAM),
  which tells the client it was not processed and may be retried on a new connection;
- the connection closes as soon as its last stream ends, or when the grace runs out.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

JITTER = 0.1


@dataclass(frozen=True, slots=True)
class ConnectionAge:
    """`max_age_s` after it opened a connection gets GOAWAY; `grace_s` later it closes."""

    max_age_s: float
    grace_s: float
    jitter: float = JITTER

    def __post_init__(self) -> None:
        if self.max_age_s <= 0 or self.grace_s < 0 or not 0 <= self.jitter < 1:
            raise ValueError(f"invalid connection age {self}")

    def age_s(self, uniform: Callable[[], float]) -> float:
        """This connection's age: `max_age_s` spread by the jitter; `uniform` draws from
        [0, 1) (random.random; a constant in tests)."""
        return self.max_age_s * (1.0 - self.jitter + 2.0 * self.jitter * uniform())


def refuses_stream(stream_id: int, last_stream_id: int | None) -> bool:
    """Whether a stream the client opened must be refused: after a GOAWAY, any stream
    beyond the last one it named."""
    return last_stream_id is not None and stream_id > last_stream_id
