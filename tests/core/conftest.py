"""Fixtures for core tests: settings defaults and the real SmolLM2 tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest

from llm_local.backends.hf_tokenizer import HFTokenizer
from llm_local.settings.schema import GenerationDefaults


@pytest.fixture(scope="session")
def smollm2_tokenizer(test_model_dir: Path) -> HFTokenizer:
    """The converted SmolLM2 model's tokenizer, read as the server reads it."""
    return HFTokenizer.from_directory(test_model_dir)


@pytest.fixture
def defaults() -> GenerationDefaults:
    return GenerationDefaults(
        max_new_tokens=64,
        max_new_tokens_limit=512,
        temperature=0.7,
        top_k=40,
        top_p=0.9,
        repetition_penalty=1.1,
        max_stop_sequences=3,
        max_stop_sequence_length=10,
    )
