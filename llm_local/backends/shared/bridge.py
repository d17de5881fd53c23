"""One generation's place in the scheduler, and its token bridge from thread to trio.

The decoding thread calls `BatchItem.offer_token` for every token CTranslate2 produces
for this item; its answer (True = stop this item) is the callback's answer. Tokens cross
into trio cheaply and in groups: the thread appends the id to a locked buffer and, only
when the item has no wake-up pending, hands the item to the `WakeupRelay`. The relay
crosses into trio with `TrioToken.run_sync_soon` (≈5 µs, against ≈40 µs for
`trio.from_thread.run`) only when no crossing is already in flight, and then wakes every
item handed to it meanwhile: a batch step of 32 items costs one crossing, not 32. The
consumer takes everything buffered at its wake-up as one group.

Lifecycle: queued → running → finished (normally, with an error, or because the
consumer left). The consumer leaving (`cancel`) makes the next `offer_token` return
True, so CTranslate2 drops the item within one decoding step.

A running batch may be stopped to merge it with newcomers (`grouping.plan_relief`): `preempt`
makes the next `offer_token` return True without taking the token, and once the batch has
returned `resume_after_preempt` appends the tokens produced so far to the prompt, so the
item continues in its next batch where it stopped: the consumer sees one stream, and the
token that was refused is produced again (the same one, for greedy decoding).
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Hashable, Sequence

import trio

from llm_local.backends.base import BackendError
from llm_local.core.types import SamplingOptions


class BatchItem:
    """A generation waiting for, or decoding in, a batch."""

    def __init__(
        self,
        prompt_ids: Sequence[int],
        max_new_tokens: int,
        sampling: SamplingOptions,
        *,
        arrived_at: float,
        relay: WakeupRelay,
        tenant_id: str | None = None,
        static_prefix: Sequence[int] = (),
    ) -> None:
        """`static_prefix`: leading prompt ids to pass as CTranslate2's static prompt
        (the shared system block, see `prefix_cache.py`); the item then batches only with
        items of the same prefix. Empty: none."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, not {max_new_tokens}")
        self._original_prompt = list(prompt_ids)
        self.prompt_ids = list(prompt_ids)  # grows by the generated tokens when re-queued
        self.max_new_tokens = max_new_tokens  # for the whole generation, across batches
        self.sampling = sampling
        if len(static_prefix) >= len(prompt_ids) or list(prompt_ids[: len(static_prefix)]) != list(
            static_prefix
        ):
            raise ValueError("static_prefix must be a shorter leading part of prompt_ids")
        self.static_prefix: tuple[int, ...] = tuple(static_prefix)
        # One static prompt per CTranslate2 call: the prefix is part of the batch key.
        key = sampling.batch_key()
        self._batch_key: Hashable = (key, self.static_prefix) if self.static_prefix else key
        self._arrived_at = arrived_at
        self._relay = relay
        self.tenant_id = tenant_id  # who asked: waiting items are planned tenant by tenant
        # Leading prompt tokens whose state the backend already held (prefix reuse): set
        # by the decoding thread before the item's first token, read once it ended.
        self.cached_tokens = 0

        # Shared with the decoding thread; guarded by _lock.
        self._lock = threading.Lock()
        self._buffer: list[int] = []
        self._generated: list[int] = []  # every token taken, across batches
        self._produced = 0
        self._preempting = False
        self._wake_pending = False
        self._cancelled = False
        self._finished = False
        self._error: BaseException | None = None
        self._ended_early = False

        # Trio side only.
        self._wakeup = trio.Event()
        self.resumed = False  # re-queued once after its batch was stopped for a merge

    # -- what the grouping policy reads -------------------------------------------------

    @property
    def batch_key(self) -> Hashable:
        return self._batch_key

    @property
    def arrived_at(self) -> float:
        return self._arrived_at

    @property
    def prompt_length(self) -> int:
        return len(self.prompt_ids)

    @property
    def generated(self) -> int:
        """Tokens produced so far, across batches."""
        with self._lock:
            return self._produced

    @property
    def remaining_new_tokens(self) -> int:
        """How many tokens the next batch may still produce for this item."""
        with self._lock:
            return max(1, self.max_new_tokens - self._produced)

    # -- decoding thread ------------------------------------------------------------------

    def offer_token(self, token_id: int, is_last: bool) -> bool:
        """Take one generated token; True means: stop decoding this item."""
        with self._lock:
            if self._cancelled or self._finished or self._preempting:
                return True
            self._buffer.append(token_id)
            self._generated.append(token_id)
            self._produced += 1
            done = is_last or self._produced >= self.max_new_tokens
            if done:
                self._finished = True
            schedule_wakeup = not self._wake_pending
            self._wake_pending = True
        if schedule_wakeup and not self._relay.request(self):
            return True  # trio is gone: nobody will read this item any more
        return done

    def end_from_thread(self, error: BaseException | None) -> None:
        """`batch_ended` for a decoding thread that ends the item without a token (an
        error, or no room left): the consumer's wake-up crosses through the relay, since
        a trio event may only be set on the trio thread."""
        with self._lock:
            if not self._settle_locked(error):
                return
            schedule_wakeup = not self._wake_pending
            self._wake_pending = True
        if schedule_wakeup:
            self._relay.request(self)

    def _settle_locked(self, error: BaseException | None) -> bool:
        """With the lock held: the item ends, failed by `error` or early (no end token and
        fewer tokens than asked: the engine stopped on its own). False if it had ended."""
        if self._finished or self._cancelled:
            return False
        self._finished = True
        if error is not None:
            self._error = error
        else:
            self._ended_early = True
        return True

    # -- trio side --------------------------------------------------------------------------

    @property
    def active(self) -> bool:
        """Still wanted and not finished: counts as running or queued."""
        with self._lock:
            return not (self._cancelled or self._finished)

    def cancel(self) -> None:
        """The consumer left: stop decoding at the next step. No effect once finished."""
        with self._lock:
            if self._finished:
                return
            self._cancelled = True
        self.wake()

    def preempt(self) -> None:
        """Trio side: stop decoding at the next step, to be re-queued (not finished)."""
        with self._lock:
            if not (self._finished or self._cancelled):
                self._preempting = True

    def resume_after_preempt(self) -> bool:
        """Trio side, once the stopped batch returned: True if the item goes back to the
        queue, its prompt now followed by its tokens so far; False if it finished or was
        cancelled meanwhile (then `batch_ended` settles it)."""
        with self._lock:
            if not self._preempting:
                return False
            self._preempting = False
            if self._finished or self._cancelled:
                return False
            self.prompt_ids = self._original_prompt + self._generated
        self.resumed = True
        return True

    def batch_ended(self, error: BaseException | None) -> None:
        """Trio side, once the item's batch returned: settles items CTranslate2 left open."""
        with self._lock:
            if not self._settle_locked(error):
                return
        self.wake()

    def fail(self, error: BaseException) -> None:
        """Fail the item before or while it decodes (e.g. the backend is closing)."""
        with self._lock:
            if self._finished:
                return
            self._finished = True
            self._error = error
        self.wake()

    def wake(self) -> None:
        """Trio side: let the consumer look at the buffer again."""
        self._wakeup.set()

    def stream(self) -> TokenStream:
        return TokenStream(self)

    async def next_group(self) -> list[int] | None:
        """Every token buffered since the last call, waiting for at least one;
        None once the item is finished and drained. Raises BackendError on failure."""
        while True:
            # A fresh event before draining: a wake-up scheduled after the drain sets it.
            self._wakeup = trio.Event()
            with self._lock:
                group, self._buffer = self._buffer, []
                self._wake_pending = False
                finished = self._finished
                cancelled = self._cancelled
                error = self._error
                ended_early = self._ended_early
            if group:
                return group
            if isinstance(error, BackendError):
                raise error
            if error is not None:
                raise BackendError(f"generation failed: {error}") from error
            if ended_early:
                raise BackendError(
                    f"decoding ended after {self._produced} of {self.max_new_tokens} tokens"
                    " without an end token"
                )
            if finished or cancelled:
                return None
            await self._wakeup.wait()


class WakeupRelay:
    """Wakes items' consumers from decoding threads, with one crossing in flight at most."""

    def __init__(self, trio_token: trio.lowlevel.TrioToken) -> None:
        self._trio_token = trio_token
        self._lock = threading.Lock()
        self._to_wake: list[BatchItem] = []
        self._crossing = False

    def request(self, item: BatchItem) -> bool:
        """Wake `item`'s consumer soon (any thread); False if the trio run is over."""
        with self._lock:
            self._to_wake.append(item)
            if self._crossing:
                return True
            self._crossing = True
        try:
            self._trio_token.run_sync_soon(self._deliver)
        except trio.RunFinishedError:
            return False
        return True

    def _deliver(self) -> None:
        with self._lock:
            items, self._to_wake = self._to_wake, []
            self._crossing = False
        for item in items:
            item.wake()


class TokenStream(AsyncIterator[Sequence[int]]):
    """The async iterator `generate()` yields: groups of token ids as they come."""

    def __init__(self, item: BatchItem) -> None:
        self._item = item

    @property
    def cached_tokens(self) -> int:
        """Prompt tokens the backend did not read again (base.ReportsCachedTokens)."""
        return self._item.cached_tokens

    def __aiter__(self) -> TokenStream:
        return self

    async def __anext__(self) -> Sequence[int]:
        group = await self._item.next_group()
        if group is None:
            raise StopAsyncIteration
        return group
