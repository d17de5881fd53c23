"""What each sequence gets at the next step: the pure rule of the scheduler (no I/O).

Every step is one ``llama_decode`` over one batch in which each request is a llama.cpp
sequence. The rule, after llama.cpp's server slots and Ollama's runner:

- every decoding sequence gets its one token first: running streams keep their pace
  whatever arrives;
- prompt tokens of newcomers fill what is left, oldest newcomer first, up to
  `prefill_chunk_tokens` in all while anything decodes (the chunk bounds how much a
  newcomer slows the running streams down, a step at a time), and up to the batch's
  capacity when nothing decodes (nobody to keep pace with);
- a newcomer whose prompt is read in full gets its first token sampled in that same step.

`admit` picks which waiting requests take the free sequences: tenants take turns
(core/fairness.py), each tenant's requests in arrival order, and a request starts only
when its prompt + max_new_tokens fit the KV cache tokens the running requests may still
claim (the pool is shared: nothing can run out of room under a decode). Admission stops at
the first request that does not fit, so that a long request is not overtaken forever.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

from llm_local.core.fairness import in_tenant_turns

T = TypeVar("T")


def plan_step(
    prompt_left: Sequence[int], *, prefill_chunk_tokens: int, batch_tokens: int
) -> list[int]:
    """Tokens each sequence feeds this step, in the order given (oldest first).

    `prompt_left[i]` is how many prompt tokens sequence i has still to read; 0 means it
    decodes (it feeds the token it sampled last step). The result's entries are 1 for a
    decoding sequence and 0..prompt_left for a prefilling one; their sum never exceeds
    `batch_tokens`.
    """
    decoding = sum(1 for left in prompt_left if left == 0)
    if decoding > batch_tokens:
        raise ValueError(f"{decoding} decoding sequences do not fit a batch of {batch_tokens}")
    room = batch_tokens - decoding
    if decoding:
        room = min(room, prefill_chunk_tokens)
    plan: list[int] = []
    for left in prompt_left:
        if left == 0:
            plan.append(1)
            continue
        take = min(left, room)
        room -= take
        plan.append(take)
    return plan


def admit(
    waiting: Sequence[T],
    free_sequences: int,
    tenant: Callable[[T], str | None],
    *,
    reserve: Callable[[T], int],
    free_tokens: int,
) -> list[T]:
    """The waiting requests that start now, in the order they start.

    `reserve(item)`: the KV cache tokens the item may come to hold; `free_tokens`: what
    the running requests leave of the pool."""
    started: list[T] = []
    for item in in_tenant_turns(waiting, tenant):
        if len(started) >= free_sequences or reserve(item) > free_tokens:
            break
        started.append(item)
        free_tokens -= reserve(item)
    return started


BASE = ""  # the adapter key of requests that name no LoRA adapter


def pick_adapter(adapters: Sequence[str], previous: str | None) -> str:
    """Which adapter's sequences decode at the next step.

    llama.cpp applies LoRA adapters to the whole context (``llama_set_adapters_lora``), so
    one step decodes the sequences of one adapter (`BASE` for none). `adapters[i]` is the
    adapter of running sequence i, oldest first; `previous` the adapter of the last step.
    The adapters present take turns, one step each, in the order of their oldest sequence:
    the one after `previous` (the oldest's when `previous` runs no more). Every running
    sequence then gets a token once per round, whatever its adapter's company; with only
    one adapter present every step is its own, as without adapters.
    """
    if not adapters:
        raise ValueError("no running sequence")
    order = list(dict.fromkeys(adapters))
    if previous not in order:
        return order[0]
    return order[(order.index(previous) + 1) % len(order)]
