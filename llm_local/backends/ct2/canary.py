"""Run the numerics probe on a CTranslate2 Generator: blocking code, run on a thread.

Two passes over the reference's probe set (see `llm_local.core.numerics`):

- greedy answers of the whole set as one batch (timed: the batched speed), plus one
  prompt alone (timed: the one-stream speed);
- one teacher-forced `score_batch` over prompt + reference answer: the NLL per token of
  the unquantized model's answers under this compute type.

For SmolLM2-135M that is ~12 x 16 generated tokens and one scoring pass: a few seconds
at most, cheap enough to repeat at every load.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from llm_local.backends.hf_tokenizer import HFTokenizer
from llm_local.core.numerics import Anchor, Measurement, ProbeItem, Reference, greedy_agreement

if TYPE_CHECKING:
    import ctranslate2


def greedy_answers(
    generator: ctranslate2.Generator,
    tokenizer: HFTokenizer,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
) -> list[tuple[int, ...]]:
    results = generator.generate_batch(
        [tokenizer.convert_ids_to_tokens(prompt) for prompt in prompts],
        max_length=max_new_tokens,
        beam_size=1,
        sampling_topk=1,
        include_prompt_in_result=False,
        end_token=sorted(tokenizer.end_token_ids) or None,
    )
    end_ids = tokenizer.end_token_ids
    return [
        tuple(token for token in result.sequences_ids[0] if token not in end_ids)
        for result in results
    ]


def mean_nll(
    generator: ctranslate2.Generator, tokenizer: HFTokenizer, items: Sequence[ProbeItem]
) -> float:
    """Mean negative log-likelihood per reference answer token, teacher-forced."""
    scored = [item for item in items if item.answer_ids]
    if not scored:
        return 0.0
    results = generator.score_batch(
        [tokenizer.convert_ids_to_tokens(item.prompt_ids + item.answer_ids) for item in scored]
    )
    total, count = 0.0, 0
    for item, result in zip(scored, results, strict=True):
        # log_probs[i] scores token i + 1: the answer's are the last len(answer).
        answer_log_probs = list(result.log_probs)[-len(item.answer_ids) :]
        total -= sum(answer_log_probs)
        count += len(answer_log_probs)
    return total / count


# Speed is timed on fixed-length decodes (end tokens ignored): the probe's own answers
# end after 2-16 tokens, which times mostly the prompt. One run per candidate keeps the
# first start short; the thread scaling, which compares close figures, takes the best of
# THREAD_RUNS.
SPEED_TOKENS = 16
BATCH_RUNS = 1
SINGLE_RUNS = 1
THREAD_RUNS = 2


def decode_speed(
    generator: ctranslate2.Generator,
    tokenizer: HFTokenizer,
    prompts: Sequence[Sequence[int]],
    *,
    runs: int,
    new_tokens: int = SPEED_TOKENS,
) -> float:
    """Generated tokens/s decoding `prompts` as one batch, `new_tokens` each; best run."""
    batch = [tokenizer.convert_ids_to_tokens(prompt) for prompt in prompts]
    best = 0.0
    for _ in range(runs):
        started = time.perf_counter()
        results = generator.generate_batch(
            batch,
            max_length=new_tokens,
            beam_size=1,
            sampling_topk=1,
            include_prompt_in_result=False,
            end_token=[],
        )
        seconds = max(time.perf_counter() - started, 1e-9)
        best = max(best, sum(len(r.sequences_ids[0]) for r in results) / seconds)
    return best


def measure(
    generator: ctranslate2.Generator,
    tokenizer: HFTokenizer,
    reference: Reference,
    *,
    compute_type: str,
    env: Mapping[str, str] | None = None,
    load_seconds: float = 0.0,
    timed: bool = True,
) -> Measurement:
    """Run the probe on `generator`: what it computed, and (`timed`) how fast. The check
    at load needs no speeds."""
    prompts = [item.prompt_ids for item in reference.items]
    answers = greedy_answers(generator, tokenizer, prompts, reference.max_new_tokens)
    agreement, equal = greedy_agreement([item.answer_ids for item in reference.items], answers)
    batch_speed = single_speed = 0.0
    if timed:
        batch_speed = decode_speed(generator, tokenizer, prompts, runs=BATCH_RUNS)
        single_speed = decode_speed(generator, tokenizer, prompts[:1], runs=SINGLE_RUNS)
    return Measurement(
        compute_type=compute_type,
        effective_type=str(generator.compute_type),
        nll=mean_nll(generator, tokenizer, reference.items),
        agreement=agreement,
        equal_answers=equal,
        batch_tokens_per_s=batch_speed,
        single_tokens_per_s=single_speed,
        load_seconds=load_seconds,
        env=dict(env or {}),
    )


def measure_anchor(model_dir: Path, items: Sequence[ProbeItem], max_new_tokens: int) -> Anchor:
    """The probe in float32 on the converted weights in `model_dir`, on the CPU."""
    import ctranslate2

    tokenizer = HFTokenizer.from_directory(model_dir)
    generator = ctranslate2.Generator(str(model_dir), device="cpu", compute_type="float32")
    try:
        answers = greedy_answers(
            generator, tokenizer, [item.prompt_ids for item in items], max_new_tokens
        )
        agreement, _ = greedy_agreement([item.answer_ids for item in items], answers)
        nll = mean_nll(generator, tokenizer, items)
    finally:
        generator.unload_model()
        del generator
    return Anchor(nll=nll, agreement=agreement)
