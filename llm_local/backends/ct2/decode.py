"""One batch through CTranslate2's `generate_batch`, on a worker thread.

Sampling options become generate_batch arguments here; the per-token callback hands
each token to its item, whose answer stops that item alone (its own max_new_tokens, an
end token, or its consumer having left) while the rest of the batch decodes on.

Seeds. CTranslate2 has no per-call seed, only the process-wide `set_random_seed`, and its
random generator is thread-local: each of its decoding threads (one per `inter_threads`
replica) seeds its own generator once, from the global seed, the first time it samples,
and never again (measured with ctranslate2 4.8.5; see its src/random.cc). So a seed cannot
make a request reproducible in a server that has already sampled. What a seed does here:
- a seeded request shares a batch only with requests of the same seed and options
  (`SamplingOptions.batch_key`);
- the global seed is set to it right before its batch is submitted, so the first sampled
  batch on a decoding thread that never sampled before (typically the first sampled
  request after start) gives the same tokens for the same seed, prompt and options, in
  every run;
- after that, that thread's generator just continues: the same seed gives other tokens.
  (A fresh process sending the same sequence of sampled requests to a single worker
  replays them all; with several workers, which worker takes a batch is not fixed.)
Greedy decoding (temperature 0 or top_k 1) ignores the seed; it is deterministic for a
given batch composition (int8 batches of mixed prompts may change it slightly, FINDINGS).

Shared prefixes. Items of one batch share their static prefix (it is part of the batch
key); it goes to CTranslate2 as `static_prompt`, cached or not as `PrefixCachePolicy`
says, and each item's prompt is what follows it. Greedy float32 output is the same
either way (tested).

Costs. The callback sees every step as it happens: the time from submitting the batch
to its first step is the prompt reading (plus one step), the time between the first
tokens of two successive steps is one step of the batch. Both feed the `CostModel`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from llm_local.backends.ct2.prefix_cache import PrefixCachePolicy
from llm_local.backends.shared.bridge import BatchItem
from llm_local.backends.shared.costs import CostModel
from llm_local.core.types import SamplingOptions

if TYPE_CHECKING:
    import ctranslate2


class TokenSpeller(Protocol):
    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]: ...


def sampling_arguments(sampling: SamplingOptions) -> dict[str, Any]:
    """generate_batch keyword arguments for `sampling` (the same for its whole batch key)."""
    if sampling.greedy:
        return {
            "sampling_topk": 1,
            "sampling_topp": 1.0,
            "sampling_temperature": 1.0,
            "repetition_penalty": sampling.repetition_penalty,
        }
    return {
        # CTranslate2's top-k 0 samples from the whole vocabulary, like our "no cut".
        "sampling_topk": sampling.top_k,
        "sampling_topp": sampling.top_p,
        "sampling_temperature": sampling.temperature,
        "repetition_penalty": sampling.repetition_penalty,
    }


def make_batch_executor(
    generator: ctranslate2.Generator,
    tokenizer: TokenSpeller,
    end_token_ids: Collection[int],
    set_random_seed: Callable[[int], None],
    *,
    costs: CostModel | None = None,
    prefixes: PrefixCachePolicy | None = None,
) -> Callable[[Sequence[BatchItem]], None]:
    """The scheduler's `execute`: decode `batch` to the end, feeding tokens to its items."""
    end_tokens = sorted(end_token_ids)

    def execute(batch: Sequence[BatchItem]) -> None:
        sampling = batch[0].sampling
        prefix = batch[0].static_prefix
        prompts = [
            tokenizer.convert_ids_to_tokens(item.prompt_ids[len(prefix) :]) for item in batch
        ]
        prefix_arguments: dict[str, Any] = {}
        prefix_tokens_read = 0
        if prefix:
            cached = prefixes is not None and prefixes.should_cache(prefix)
            prefix_arguments = {
                "static_prompt": tokenizer.convert_ids_to_tokens(prefix),
                "cache_static_prompt": cached,
            }
            # A cache hit reads nothing; a miss (or no caching) reads the prefix once.
            warm = cached and prefixes is not None and prefixes.is_warm(prefix)
            prefix_tokens_read = 0 if warm else len(prefix)
        # CTranslate2 reads the common length of the prompts at once (less the last token,
        # which the first step feeds); what a longer prompt has beyond it costs steps.
        shortest = min(len(prompt) for prompt in prompts)
        clock = _StepClock(costs, len(batch), prefix_tokens_read + len(batch) * (shortest - 1))

        def on_step(step: ctranslate2.GenerationStepResult) -> bool:
            clock.tick(step.step)
            item: BatchItem = batch[step.batch_id]
            return item.offer_token(step.token_id, step.is_last)

        if sampling.seed is not None and not sampling.greedy:
            # CTranslate2 takes an unsigned 32-bit seed; the wire carries an int64.
            set_random_seed(sampling.seed % 2**32)
        clock.start()
        generator.generate_batch(
            prompts,
            include_prompt_in_result=False,
            # Each item stops at its own max_new_tokens through the callback.
            max_length=max(item.remaining_new_tokens for item in batch),
            beam_size=1,
            end_token=end_tokens or None,  # None: the model's own eos
            callback=on_step,
            **prefix_arguments,
            **sampling_arguments(sampling),
        )
        if prefix and prefixes is not None:
            prefixes.mark_warm(prefix)

    return execute


class _StepClock:
    """Times a batch's steps from its callbacks (on the decoding thread)."""

    def __init__(self, costs: CostModel | None, size: int, prefill_tokens: int) -> None:
        self._costs = costs
        self._size = size
        self._prefill_tokens = prefill_tokens
        self._started = 0.0
        self._step = -1
        self._step_at = 0.0
        self._reporting = 0  # items that reported in the current step

    def start(self) -> None:
        self._started = time.perf_counter()

    def tick(self, step: int) -> None:
        if self._costs is None:
            return
        if step == self._step:
            self._reporting += 1
            return
        now = time.perf_counter()
        if self._step < 0:
            # Reading the prompts, then one step of the whole batch.
            estimate = self._costs.estimate()
            reading = now - self._started - estimate.step_s(self._size)
            self._costs.observe_prefill(self._prefill_tokens, reading)
        elif step == self._step + 1:
            self._costs.observe_step(self._reporting, now - self._step_at)
        self._step = step
        self._step_at = now
        self._reporting = 1
