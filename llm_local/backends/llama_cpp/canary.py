"""The numerics check of the llama_cpp backend (issue 10's canary), at load, on this CPU.

The reference is the one `llm-local convert` records for the GGUF (convert/gguf_reference.py):
the unquantized model's greedy answers to the probe set and their NLL per token. Here the
loaded context computes, with the kernels and threads it will serve with:

- the teacher-forced NLL of every reference answer: prompt + answer fed as one sequence,
  logits requested for every answer position (one `llama_decode` per batch's worth);
- greedy answers to the probe prompts, the prompts decoded as parallel sequences one
  token per step, as the scheduler serves them.

`core.numerics.judge` compares both with the reference and the bounds of `[numerics]`,
and the failure policy is the ct2 backend's for an explicit compute type (the GGUF's type
is the one this backend runs): a check that fails refuses the load (NumericsRejected: the
service stays "failed" with the reason, no retry) unless `numerics.accept_unverified`,
which serves with a warning; no reference serves unverified, saying so; the check off
(`numerics.check_at_load = false`) serves unverified, saying so. /health, /config and
/metrics report the outcome (`ModelInfo.numerics`).

It borrows sequences of the context before the scheduler starts and frees them after:
for SmolLM2-135M, 12 prompts, 16 tokens each, about a second on one core.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from llm_local.backends.base import BackendLoadError, NumericsRejected
from llm_local.core.numerics import (
    Bounds,
    Measurement,
    NumericsStatus,
    ProbeItem,
    Reference,
    greedy_agreement,
    judge,
)

if TYPE_CHECKING:
    from llm_local.settings.schema import NumericsSettings

log = logging.getLogger("llm_local.backends.llama_cpp")

NO_REFERENCE = (
    "no numerics reference recorded for this GGUF "
    '(run `llm-local convert` with backend = "llama_cpp")'
)
NO_ADAPTER_REFERENCE = (
    "no numerics reference recorded for LoRA adapter {!r} on this GGUF "
    '(run `llm-local convert` with backend = "llama_cpp")'
)
CHECK_OFF = "numerics.check_at_load is off"
CHOSEN_BY = "settings"  # the GGUF's weight type is what the settings name; nothing is picked


class CanaryDecodeError(BackendLoadError):
    """llama_decode failed while the check ran (a KV cache too small for the probe?)."""


def numerics_status(
    compute_type: str,
    numerics: NumericsSettings | None,
    reference: Reference | None,
    measure: Callable[[Reference], Measurement],
    adapter: str | None = None,
) -> NumericsStatus | None:
    """What serves and how far it can be trusted; raises NumericsRejected when the check
    fails and unverified numerics are not accepted. `measure` runs the probe. With
    `adapter`, the probe runs with that LoRA adapter applied and `reference` is the
    unquantized base + adapter's (convert/adapter_reference.py); the policy is the model's."""
    if numerics is None:  # no check asked for (benches, unit tests)
        return None
    if not numerics.check_at_load:
        return NumericsStatus(compute_type, False, None, None, CHOSEN_BY, warning=CHECK_OFF)
    subject = compute_type if adapter is None else f"{compute_type} + LoRA adapter {adapter!r}"
    if reference is None:
        missing = NO_REFERENCE if adapter is None else NO_ADAPTER_REFERENCE.format(adapter)
        log.warning("%s: serving %s unverified", missing, subject)
        return NumericsStatus(compute_type, False, None, None, CHOSEN_BY, warning=missing)
    bounds = Bounds(numerics.max_nll_ratio, numerics.min_agreement_ratio)
    started = time.perf_counter()
    measurement = measure(reference)
    judgement = judge(measurement, reference, bounds)
    log.info(
        "numerics check of %s in %.1f s: NLL ratio %.3f (bound %g), greedy agreement %.2f of "
        "float32's (bound %g), %d of %d answers equal: %s",
        subject,
        time.perf_counter() - started,
        judgement.nll_ratio,
        bounds.max_nll_ratio,
        judgement.agreement_ratio,
        bounds.min_agreement_ratio,
        measurement.equal_answers,
        len(reference.items),
        "faithful" if judgement.passed else "NOT faithful",
    )
    status = NumericsStatus(
        compute_type,
        judgement.passed,
        judgement.nll_ratio,
        judgement.agreement_ratio,
        CHOSEN_BY,
        warning=judgement.reason,
    )
    if judgement.passed:
        return status
    if numerics.accept_unverified:
        log.warning("serving unverified numerics (numerics.accept_unverified): %s", status.warning)
        return status
    if adapter is not None:
        raise NumericsRejected(
            f"llama.cpp does not compute {subject} faithfully on this machine (against the "
            f"unquantized base + adapter): {judgement.reason}; remove the adapter from "
            "[adapters], serve it on the transformers backend, or set numerics.accept_unverified"
        )
    raise NumericsRejected(
        f"llama.cpp does not compute {compute_type} faithfully on this machine: "
        f"{judgement.reason}; try llama_cpp.repack = false, another backend, or set "
        "numerics.accept_unverified"
    )


class Probe:
    """Runs the probe on a loaded context: `measure(reference)` (loading thread only)."""

    def __init__(
        self,
        lib: Any,
        ctx: Any,
        memory: Any,
        *,
        vocab_size: int,
        end_token_ids: frozenset[int],
        batch_tokens: int,
        sequences: int,
        kv_cache_tokens: int,
        compute_type: str,
    ) -> None:
        self._lib = lib
        self._ctx = ctx
        self._memory = memory
        self._vocab_size = vocab_size
        self._end_ids = end_token_ids
        self._batch_tokens = batch_tokens
        self._sequences = max(1, sequences)
        self._kv_cache_tokens = kv_cache_tokens
        self._compute_type = compute_type

    def measure(self, reference: Reference) -> Measurement:
        batch = self._lib.llama_batch_init(self._batch_tokens, 0, 1)
        items = reference.items
        answers: list[tuple[int, ...]] = []
        total, count = 0.0, 0
        # As many items at once as sequences allow and the KV cache pool holds.
        longest = max(
            len(item.prompt_ids) + max(len(item.answer_ids), reference.max_new_tokens)
            for item in items
        )
        parallel = max(1, min(self._sequences, self._kv_cache_tokens // longest))
        try:
            for start in range(0, len(items), parallel):
                group = items[start : start + parallel]
                group_total, group_count, predicted = self._score(batch, group)
                total, count = total + group_total, count + group_count
                prompts = [item.prompt_ids for item in group]
                answers.extend(self._greedy(batch, prompts, predicted, reference.max_new_tokens))
                self._clear(len(group))
        finally:
            self._lib.llama_batch_free(batch)
            self._clear(self._sequences)
        agreement, equal = greedy_agreement([item.answer_ids for item in items], answers)
        return Measurement(
            compute_type=self._compute_type,
            effective_type=self._compute_type,
            nll=total / count if count else 0.0,
            agreement=agreement,
            equal_answers=equal,
            batch_tokens_per_s=0.0,
            single_tokens_per_s=0.0,
            load_seconds=0.0,
        )

    # -- the two passes -----------------------------------------------------------------------

    def _score(self, batch: Any, items: Sequence[ProbeItem]) -> tuple[float, int, dict[int, int]]:
        """(summed NLL, tokens scored, each sequence's greedy first token): item i is
        teacher-forced on sequence i, then its answer is removed from the KV cache so
        that the greedy pass continues from the prompt without reading it again."""
        total, count = 0.0, 0
        predicted: dict[int, int] = {}
        for seq, item in enumerate(items):
            tokens = list(item.prompt_ids) + list(item.answer_ids)
            # The row of position p predicts the token at p + 1: the answer's first token
            # is predicted by the prompt's last position.
            first = len(item.prompt_ids) - 1
            rows: dict[int, np.ndarray[Any, Any]] = {}
            self._feed(batch, seq, tokens, first, rows)
            for position in range(first, len(tokens) - 1):
                total -= _log_softmax_at(rows[position], tokens[position + 1])
                count += 1
            predicted[seq] = int(np.argmax(rows[first]))
            if item.answer_ids and not self._lib.llama_memory_seq_rm(
                self._memory, seq, len(item.prompt_ids), -1
            ):
                # A memory that cannot drop a tail (recurrent models): read the prompt again.
                self._lib.llama_memory_seq_rm(self._memory, seq, -1, -1)
                self._feed(batch, seq, list(item.prompt_ids), first, {})
        return total, count, predicted

    def _greedy(
        self,
        batch: Any,
        prompts: Sequence[Sequence[int]],
        predicted: dict[int, int],
        max_new_tokens: int,
    ) -> list[tuple[int, ...]]:
        """Greedy answers (end token excluded), sequence i continuing prompt i, whose
        first token is `predicted[i]`; all sequences one token per step in one batch."""
        answers: list[list[int]] = [[] for _ in prompts]
        while predicted:
            steps: list[tuple[int, int, int]] = []  # (sequence, token, position)
            for seq, token in predicted.items():
                if token in self._end_ids:
                    continue
                answers[seq].append(token)
                if len(answers[seq]) < max_new_tokens:
                    steps.append((seq, token, len(prompts[seq]) + len(answers[seq]) - 1))
            if not steps:
                break
            predicted = self._step(batch, steps)
        return [tuple(answer) for answer in answers]

    def _clear(self, sequences: int) -> None:
        for seq in range(sequences):
            self._lib.llama_memory_seq_rm(self._memory, seq, -1, -1)

    # -- the library --------------------------------------------------------------------------

    def _step(self, batch: Any, steps: list[tuple[int, int, int]]) -> dict[int, int]:
        """One token per sequence at its position, as one batch; each one's greedy choice."""
        batch.n_tokens = len(steps)
        for index, (seq, token, position) in enumerate(steps):
            batch.token[index] = token
            batch.pos[index] = position
            batch.n_seq_id[index] = 1
            batch.seq_id[index][0] = seq
            batch.logits[index] = 1
        self._decode(batch)
        return {seq: int(np.argmax(self._row(index))) for index, (seq, _, _) in enumerate(steps)}

    def _feed(
        self,
        batch: Any,
        seq: int,
        tokens: list[int],
        first_logits: int,
        rows: dict[int, np.ndarray[Any, Any]],
    ) -> None:
        """Feed `tokens` to `seq` from position 0, in chunks of the batch size; the logits
        rows of the positions from `first_logits` on go into `rows`."""
        for chunk_start in range(0, len(tokens), self._batch_tokens):
            chunk = tokens[chunk_start : chunk_start + self._batch_tokens]
            batch.n_tokens = len(chunk)
            wanted: list[tuple[int, int]] = []
            for index, token in enumerate(chunk):
                position = chunk_start + index
                batch.token[index] = token
                batch.pos[index] = position
                batch.n_seq_id[index] = 1
                batch.seq_id[index][0] = seq
                batch.logits[index] = 1 if position >= first_logits else 0
                if position >= first_logits:
                    wanted.append((index, position))
            self._decode(batch)
            for index, position in wanted:
                rows[position] = self._row(index)

    def _decode(self, batch: Any) -> None:
        status = int(self._lib.llama_decode(self._ctx, batch))
        if status != 0:
            raise CanaryDecodeError(
                f"llama_decode failed with status {status} during the numerics check "
                "(is llama_cpp.kv_cache_tokens large enough for the probe set?)"
            )

    def _row(self, index: int) -> np.ndarray[Any, Any]:
        pointer = self._lib.llama_get_logits_ith(self._ctx, index)
        return np.ctypeslib.as_array(pointer, shape=(self._vocab_size,)).astype(np.float64)


def _log_softmax_at(row: np.ndarray[Any, Any], token: int) -> float:
    """log p(token) from one row of logits, computed in float64."""
    shifted = row - row.max()
    return float(shifted[token] - np.log(np.exp(shifted).sum()))
