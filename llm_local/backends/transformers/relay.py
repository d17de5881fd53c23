"""Tokens from transformers' generation thread to each request's consumer in trio.

transformers' continuous batching manager hands every output of a step to its
`OutputRouter` on its generation thread, as one list. `TokenRelay` takes that router's
place: for each output it passes the request's new tokens to the request's `BatchItem`
(the shared thread-to-trio token buffer, `backends.shared.bridge`), whose `WakeupRelay` crosses
into trio once per step for all of them. Outputs of requests nobody waits for any more
(cancelled, their consumer gone) are dropped, where transformers' own router would queue
them forever for a `get_result` call that never comes.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from llm_local.backends.base import BackendError
from llm_local.backends.shared.bridge import BatchItem


@dataclass(slots=True)
class _Tracked:
    item: BatchItem
    taken: int = 0  # generated tokens already passed on (outputs carry all of them)


def output_router_base() -> type[Any]:
    """transformers' OutputRouter, imported only when the backend loads (torch is heavy)."""
    from transformers.generation.continuous_batching.continuous_api import OutputRouter

    router: type[Any] = OutputRouter
    return router


class TokenRelay:
    """Request id -> BatchItem; `deliver_batch` runs on the generation thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tracked: dict[str, _Tracked] = {}

    def track(self, request_id: str, item: BatchItem) -> None:
        with self._lock:
            self._tracked[request_id] = _Tracked(item)

    def forget(self, request_id: str) -> None:
        with self._lock:
            self._tracked.pop(request_id, None)

    def fail(self, request_id: str, error: BaseException) -> None:
        """One request fails with `error`, from any thread; its later outputs are dropped."""
        with self._lock:
            entry = self._tracked.pop(request_id, None)
        if entry is not None:
            entry.item.end_from_thread(error)

    def note_cached(self, request_id: str, tokens: int) -> None:
        """The request's leading prompt tokens the engine shared instead of reading
        (generation thread, before its first token)."""
        with self._lock:
            entry = self._tracked.get(request_id)
        if entry is not None:
            entry.item.cached_tokens = tokens

    def fail_all(self, error: BaseException) -> None:
        """Every tracked request fails with `error` (the generation thread has died)."""
        with self._lock:
            tracked, self._tracked = list(self._tracked.values()), {}
        for entry in tracked:
            entry.item.fail(error)

    def deliver_batch(self, outputs: Sequence[Any]) -> None:
        for output in outputs:
            self.deliver(output)

    def deliver(self, output: Any) -> None:
        """One request's GenerationOutput: its new tokens, its end, or its failure."""
        with self._lock:
            entry = self._tracked.get(output.request_id)
        if entry is None:
            return  # its consumer left: nobody reads it
        finished = bool(output.is_finished())
        if output.error is not None:
            self.forget(output.request_id)
            # From the generation thread: the wake-up must cross through the relay (a trio
            # event set here would reschedule a waiting consumer from a foreign thread).
            entry.item.end_from_thread(
                BackendError(f"transformers failed the generation: {output.error}")
            )
            return
        tokens = output.generated_tokens
        fresh = tokens[entry.taken :]
        entry.taken = len(tokens)
        for position, token_id in enumerate(fresh):
            is_last = finished and position == len(fresh) - 1
            if entry.item.offer_token(int(token_id), is_last):
                break
        if finished:
            self.forget(output.request_id)
            # Finished without a token (nothing left to offer): settle the item, from
            # this thread as above.
            entry.item.end_from_thread(None)


def make_output_router(relay: TokenRelay) -> Any:
    """An instance of transformers' OutputRouter whose deliveries go to `relay`."""
    base = output_router_base()

    class RelayingRouter(base):  # type: ignore[misc,valid-type]
        def deliver(self, output: Any) -> None:
            relay.deliver(output)

        def deliver_batch(self, outputs: list[Any]) -> None:
            relay.deliver_batch(outputs)

    return RelayingRouter()
