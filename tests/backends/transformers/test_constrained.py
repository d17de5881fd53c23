"""GrammarMasks, the transformers backend's structured-output logits processor, over the real
SmolLM2 tokenizer and llguidance, with request states shaped as the manager hands them:
a row's grammar follows the tokens its request generated, only constrained rows are
masked, a token the grammar rejects fails that request alone."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from llm_local.backends.hf_tokenizer import HFTokenizer
from llm_local.backends.shared import grammar
from llm_local.backends.transformers.constrained import GrammarMasks, supports_masks
from llm_local.core.structured.constraint import OutputConstraint, canonical_json

ANSWER = OutputConstraint(field="response_format", schema=canonical_json({"enum": ["yes", "no"]}))


@pytest.fixture(scope="module")
def tokenizer(test_model_dir: Path) -> HFTokenizer:
    return HFTokenizer.from_directory(test_model_dir)


@pytest.fixture(scope="module")
def compiler(tokenizer: HFTokenizer) -> grammar.GrammarCompiler:
    llg = grammar.tokenizer_for_hf(
        tokenizer.to_json(), tokenizer.vocab_size, tokenizer.end_token_ids
    )
    return grammar.GrammarCompiler(llg)


def row(request_id: str, generated: list[int]) -> SimpleNamespace:
    """A FutureRequestState as prepare_tensor_args gets it."""
    return SimpleNamespace(state=SimpleNamespace(request_id=request_id, generated_tokens=generated))


def scores_preferring(tokenizer: HFTokenizer, text: str, rows: int) -> torch.Tensor:
    """Logits whose favourite token, on every row, is the first token of `text`."""
    scores = torch.zeros(rows, tokenizer.vocab_size)
    scores[:, tokenizer.encode(text)[0]] = 10.0
    return scores


def step(masks: GrammarMasks, rows: list[SimpleNamespace], scores: torch.Tensor) -> torch.Tensor:
    masks.prepare(rows)
    result: torch.Tensor = masks.apply(scores)
    return result


def test_without_a_constrained_request_the_scores_pass_untouched(
    tokenizer: HFTokenizer,
) -> None:
    masks = GrammarMasks(lambda request_id, why: None)
    scores = scores_preferring(tokenizer, "Hello", 2)
    before = scores.clone()

    assert step(masks, [row("a", []), row("b", [1, 2])], scores) is scores
    assert torch.equal(scores, before)


def test_only_the_constrained_row_is_masked_and_its_grammar_follows_its_tokens(
    tokenizer: HFTokenizer, compiler: grammar.GrammarCompiler
) -> None:
    masks = GrammarMasks(lambda request_id, why: None)
    masks.track("json", compiler.matcher(ANSWER))
    free_before = scores_preferring(tokenizer, "Hello", 1)[0]

    # First row: the prompt was read, nothing generated yet; the free row sits before it.
    scores = step(
        masks, [row("free", []), row("json", [])], scores_preferring(tokenizer, "Hello", 2)
    )
    assert torch.equal(scores[0], free_before)  # the free row: untouched
    first = int(scores[1].argmax())
    assert tokenizer.decode([first]).startswith('"'), tokenizer.decode([first])

    # The request generated the whole answer, token by token, over later steps.
    answer = tokenizer.encode('"yes"')
    generated: list[int] = []
    for token in answer:
        generated.append(token)
        scores = step(
            masks, [row("json", list(generated))], scores_preferring(tokenizer, "Hello", 1)
        )
    # The value is complete: only an end token may follow.
    allowed = torch.isfinite(scores[0]).nonzero().flatten().tolist()
    assert allowed and set(allowed) <= tokenizer.end_token_ids


def test_a_rejected_token_fails_that_request_alone(
    tokenizer: HFTokenizer, compiler: grammar.GrammarCompiler
) -> None:
    failed: list[tuple[str, str]] = []
    masks = GrammarMasks(lambda request_id, why: failed.append((request_id, why)))
    masks.track("bad", compiler.matcher(ANSWER))
    masks.track("good", compiler.matcher(ANSWER))
    step(masks, [row("bad", []), row("good", [])], scores_preferring(tokenizer, "Hello", 2))

    wrong = tokenizer.encode("Hello")
    good = tokenizer.encode('"no"')[:1]
    scores = step(
        masks, [row("bad", wrong), row("good", good)], scores_preferring(tokenizer, "Hello", 2)
    )

    assert [request_id for request_id, _ in failed] == ["bad"]
    assert torch.isfinite(scores[0]).all()  # the failed row is left alone
    assert not torch.isfinite(scores[1]).all()  # the good one is still masked
    step(masks, [row("bad", wrong), row("good", good)], scores_preferring(tokenizer, "Hello", 2))
    assert len(failed) == 1  # reported once


def manager_with(**config: object) -> SimpleNamespace:
    resolved = {
        "use_async_batching": False,
        "use_cuda_graph": (False, False),
        "varlen_compile_config": None,
        "decode_compile_config": None,
        **config,
    }
    return SimpleNamespace(continuous_batching_config=SimpleNamespace(**resolved))


@pytest.mark.parametrize(
    ("config", "supported"),
    [
        ({}, True),  # the CPU's resolution: synchronous, no graphs, not compiled
        ({"use_async_batching": True}, False),  # the fed token is only on the device
        ({"use_cuda_graph": (False, True)}, False),  # a replayed graph runs no Python
        ({"use_cuda_graph": True}, False),
        ({"decode_compile_config": object()}, False),
    ],
)
def test_masks_are_offered_only_where_the_manager_runs_them_every_step(
    config: dict[str, object], supported: bool
) -> None:
    assert supports_masks(manager_with(**config)) is supported
