"""One llama.cpp sampler chain per request: its own options, seed and penalty history.

A chain per sequence is what lets greedy and sampled requests, and different seeds,
decode in one batch: `llama_sampler_sample` reads the sequence's own row of logits.

- greedy: the greedy sampler alone (argmax);
- sampled: penalties -> top-k -> top-p -> temperature -> a draw seeded by the request's
  seed (or a fresh one), the order of llama.cpp's own default chain, without a cut that
  cuts nothing;
- a repetition penalty counts the prompt too (as CTranslate2 and transformers do): the
  prompt's tokens are accepted into the chain before the first draw.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from typing import Any

from llm_local.core.types import SamplingOptions

# Tokens a repetition penalty looks back on; -1 would be the whole context, but the
# library keeps that window in a ring buffer sized by it.
PENALTY_WINDOW = 256


class SamplerChain:
    """A sampler chain owned by one request; `free` once, on the decoding thread."""

    def __init__(self, lib: Any, sampling: SamplingOptions, vocab_size: int) -> None:
        self._lib = lib
        self.handle = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
        self.penalised = sampling.repetition_penalty != 1.0
        if self.penalised:
            self._add(
                # This llama.cpp's signature: (n_vocab, last_n, repeat, frequency, presence).
                lib.llama_sampler_init_penalties(
                    vocab_size, PENALTY_WINDOW, float(sampling.repetition_penalty), 0.0, 0.0
                )
            )
        if sampling.greedy:
            self._add(lib.llama_sampler_init_greedy())
            return
        # A cut that cuts nothing (top_k 0, top_p 1) is left out of the chain: top-k over
        # the whole vocabulary sorts it, every token (3.2 against 0.8 ms a sampled token
        # for SmolLM2's 49,152, one thread).
        if sampling.top_k:
            self._add(lib.llama_sampler_init_top_k(sampling.top_k))
        if sampling.top_p < 1.0:
            self._add(lib.llama_sampler_init_top_p(float(sampling.top_p), 1))
        self._add(lib.llama_sampler_init_temp(float(sampling.temperature)))
        seed = sampling.seed if sampling.seed is not None else secrets.randbits(32)
        self._add(lib.llama_sampler_init_dist(seed & 0xFFFFFFFF))

    def _add(self, sampler: Any) -> None:
        self._lib.llama_sampler_chain_add(self.handle, sampler)  # the chain owns it now

    def accept_prompt(self, prompt_ids: Sequence[int]) -> None:
        if self.penalised:
            for token in prompt_ids[-PENALTY_WINDOW:]:
                self._lib.llama_sampler_accept(self.handle, token)

    def sample(self, ctx: Any, batch_index: int) -> int:
        """The next token from the logits of batch row `batch_index` (accepted too)."""
        return int(self._lib.llama_sampler_sample(self.handle, ctx, batch_index))

    def free(self) -> None:
        handle, self.handle = self.handle, None
        if handle:
            self._lib.llama_sampler_free(handle)
