"""Structured output in the llama.cpp scheduler: each step's token masks, off the critical
path.

A request's mask for its next token depends only on the tokens it accepted so far, so the
scheduler starts computing the masks of the step (`MaskWorker.start`, on a helper thread;
llguidance releases the GIL) right before `llama_decode`, which releases it too, and
waits for them (`Pending.wait`) only once the logits are there. `mask_row` then forbids,
in the row of logits the sampler chain reads, every token the grammar does not allow.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from llm_local.backends.shared.grammar import TokenMask


class MaskWorker:
    """One helper thread, started at the first constrained request."""

    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None

    def start(self, masks: Sequence[TokenMask]) -> Future[None] | None:
        if not masks:
            return None
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="llama-cpp-masks")
        return self._pool.submit(_compute, list(masks))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)


def _compute(masks: list[TokenMask]) -> None:
    for mask in masks:
        mask.compute()


def mask_row(lib: Any, ctx: Any, row: int, vocab_size: int, mask: TokenMask) -> None:
    """Forbid, in place, the tokens `mask` does not allow in batch row `row`'s logits."""
    logits = np.ctypeslib.as_array(lib.llama_get_logits_ith(ctx, row), shape=(vocab_size,))
    mask.apply(logits)
