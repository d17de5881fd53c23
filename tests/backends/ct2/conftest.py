"""The real SmolLM2 model, loaded once per session and shared by the CT2 backend tests.

Each test builds its own backend around the shared model (`CT2Backend.from_loaded`),
because a backend's scheduler lives in one trio run and each test is its own trio run.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from llm_local.backends.base import ModelTokenizer
from llm_local.backends.ct2.loader import LoadedModel, LoadPlan, load_model
from llm_local.core.prompt import prepare_prompt
from llm_local.core.types import GenerationRequest

FRANCE = "What is the capital of France? Answer in one sentence."


def plan(model_dir: Path, compute_type: str, *, inter_threads: int = 2) -> LoadPlan:
    return LoadPlan(
        model_dir=model_dir,
        model_name="SmolLM2-135M-Instruct",
        device="cpu",
        device_index=0,
        compute_type=compute_type,
        inter_threads=inter_threads,
        intra_threads=1,
        context_limit=0,
    )


def _loaded(model_dir: Path, compute_type: str) -> Iterator[LoadedModel]:
    model = load_model(plan(model_dir, compute_type))
    yield model
    # Released while the interpreter is fully alive (see FINDINGS: abort at exit).
    model.generator.unload_model()
    del model


@pytest.fixture(scope="session")
def int8_model(test_model_dir: Path) -> Iterator[LoadedModel]:
    yield from _loaded(test_model_dir, "int8")


@pytest.fixture(scope="session")
def float32_model(test_model_dir: Path) -> Iterator[LoadedModel]:
    # The int8 weights computed in float32: batching then does not change greedy output.
    yield from _loaded(test_model_dir, "float32")


def chat_ids(tokenizer: ModelTokenizer, question: str) -> tuple[int, ...]:
    """Prompt ids of `question` as a one-turn chat, through core's prompt builder."""
    request = GenerationRequest(user_prompt=question)
    return prepare_prompt(request, tokenizer, context_limit=2048).ids
