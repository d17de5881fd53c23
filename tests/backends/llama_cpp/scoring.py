"""Teacher-forced scoring on the real GGUF, for tests that compare answers decoded among
other sequences with answers decoded alone.

llama.cpp's CPU rounding follows the batch's shape and where a sequence's cells lie in the
KV cache (docs/FINDINGS.md), so two greedy runs of one prompt may part at a near tie. Where
they part, the model scored alone must find both tokens about equally likely; an answer
computed from the wrong state (another request's cells, a mask on the wrong row) picks a
token the prompt does not predict."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from llm_local.backends.llama_cpp.backend import LlamaCppBackend
from llm_local.backends.llama_cpp.library import (
    ContextOptions,
    LoadedLibraryModel,
    ModelOptions,
    library,
)

# Where an answer decoded among others first leaves its alone-answer, the most the model
# (scored alone) may prefer the alone-answer's token over the one taken, in nats: a near tie.
# Measured: -0.25 .. +0.19 over the 12 calls that diverged in one run of the 16-call test,
# and 0.53 once in a fresh clone's `make test` (0.5 then failed it): rounding flips tokens
# up to about half a nat apart. One nat (the alone model finds the taken token 2.7 times
# less likely) leaves room for that; a token chosen from another conversation's state is
# one the prompt does not predict, many nats below.
NEAR_TIE_NATS = 1.0


class Scorer:
    """Teacher-forced log-likelihood of an answer after its prompt, in a context of its own
    (one sequence, fresh cells in position order): the reference a cache must not move."""

    def __init__(self, backend: LlamaCppBackend, gguf: Path) -> None:
        self._tokenizer = backend.tokenizer
        self._lib = library()
        self._handle = LoadedLibraryModel(
            self._lib,
            gguf,
            ModelOptions(gpu_layers=0, repack=False),
            ContextOptions(kv_cache_tokens=1024, sequences=1, batch_tokens=1024, threads=2),
        )

    def divergence_gap(self, prompt: Sequence[int], mine: str, reference: str) -> float:
        """At the first token where `mine` leaves `reference` (both after `prompt`), how
        much less likely the model finds my token than the reference's, in nats: about 0
        for a near tie that rounding flipped; large for an answer to another conversation."""
        ids_mine = self._tokenizer.encode(mine)
        ids_ref = self._tokenizer.encode(reference)
        common = 0
        while common < min(len(ids_mine), len(ids_ref)) and ids_mine[common] == ids_ref[common]:
            common += 1
        if common == len(ids_mine) or common == len(ids_ref):
            return 0.0  # one ends where the other goes on: the end token decided, not text
        row = self._next_logprobs([*prompt, *ids_ref[:common]])
        return float(row[ids_ref[common]] - row[ids_mine[common]])

    def _next_logprobs(self, ids: Sequence[int]) -> np.ndarray:
        lib, handle = self._lib, self._handle
        lib.llama_memory_seq_rm(handle.memory, 0, -1, -1)
        batch = lib.llama_batch_init(len(ids), 0, 1)
        try:
            for i, token in enumerate(ids):
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, i, 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = 1 if i == len(ids) - 1 else 0
            batch.n_tokens = len(ids)
            assert lib.llama_decode(handle.ctx, batch) == 0
            vocab = self._tokenizer.vocab_size
            row = np.ctypeslib.as_array(
                lib.llama_get_logits_ith(handle.ctx, len(ids) - 1), (vocab,)
            )
            logits = row.astype(np.float64)
            top = logits.max()
            result: np.ndarray = logits - (np.log(np.exp(logits - top).sum()) + top)
            return result
        finally:
            lib.llama_batch_free(batch)

    def free(self) -> None:
        self._handle.free()
