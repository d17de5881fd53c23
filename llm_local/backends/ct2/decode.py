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
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from llm_local.backends.ct2.item import BatchItem
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
) -> Callable[[Sequence[BatchItem]], None]:
    """The scheduler's `execute`: decode `batch` to the end, feeding tokens to its items."""
    end_tokens = sorted(end_token_ids)

    def execute(batch: Sequence[BatchItem]) -> None:
        sampling = batch[0].sampling
        prompts = [tokenizer.convert_ids_to_tokens(item.prompt_ids) for item in batch]

        def on_step(step: ctranslate2.GenerationStepResult) -> bool:
            item: BatchItem = batch[step.batch_id]
            return item.offer_token(step.token_id, step.is_last)

        if sampling.seed is not None and not sampling.greedy:
            # CTranslate2 takes an unsigned 32-bit seed; the wire carries an int64.
            set_random_seed(sampling.seed % 2**32)
        generator.generate_batch(
            prompts,
            include_prompt_in_result=False,
            # Each item stops at its own max_new_tokens through the callback.
            max_length=max(item.remaining_new_tokens for item in batch),
            beam_size=1,
            end_token=end_tokens or None,  # None: the model's own eos
            callback=on_step,
            **sampling_arguments(sampling),
        )

    return execute
