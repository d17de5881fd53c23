"""Fixtures for core tests: settings defaults and real tokenizers behind ModelTokenizer."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from llm_local.settings.schema import GenerationDefaults

BYTE_PIECE = re.compile(r"<0x[0-9A-F]{2}>")


class TokenizersAdapter:
    """A `tokenizers.Tokenizer` seen through the ModelTokenizer protocol (test-local)."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        end_token_ids: frozenset[int] = frozenset(),
        chat_template: str | None = None,
        special_tokens: dict[str, str] | None = None,
    ) -> None:
        self.inner = tokenizer
        self._end_token_ids = end_token_ids
        self._chat_template = chat_template
        self._special_tokens = special_tokens or {}
        self.byte_token_ids = frozenset(
            token_id
            for token, token_id in tokenizer.get_vocab().items()
            if BYTE_PIECE.fullmatch(token)
        )

    @property
    def end_token_ids(self) -> frozenset[int]:
        return self._end_token_ids

    @property
    def chat_template(self) -> str | None:
        return self._chat_template

    @property
    def special_tokens(self) -> dict[str, str]:
        return self._special_tokens

    def encode(self, text: str) -> list[int]:
        ids: list[int] = self.inner.encode(text, add_special_tokens=False).ids
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        text: str = self.inner.decode(list(ids), skip_special_tokens=True)
        return text


@pytest.fixture(scope="session")
def tokenizer_adapter() -> type[TokenizersAdapter]:
    return TokenizersAdapter


@pytest.fixture(scope="session")
def smollm2_tokenizer(test_model_dir: Path) -> TokenizersAdapter:
    tokenizer = Tokenizer.from_file(str(test_model_dir / "tokenizer.json"))
    template_file = test_model_dir / "chat_template.jinja"
    return TokenizersAdapter(
        tokenizer,
        end_token_ids=frozenset({2}),
        chat_template=template_file.read_text() if template_file.exists() else None,
        special_tokens={"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"},
    )


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
