from __future__ import annotations

from llm_local.backends.base import ModelTokenizer
from llm_local.backends.fake import END_OF_TEXT, IM_END, IM_START, FakeTokenizer
from llm_local.core.prompt import build_prompt
from llm_local.core.types import GenerationRequest


def test_every_utf8_byte_is_one_token_and_specials_are_single_ids() -> None:
    tokenizer = FakeTokenizer()
    assert tokenizer.encode("aç") == [0x61, 0xC3, 0xA7]
    assert tokenizer.encode("<|im_start|>user\nhi<|im_end|>") == [
        IM_START,
        *b"user\nhi",
        IM_END,
    ]
    assert tokenizer.encode("") == []


def test_decode_skips_special_tokens_and_replaces_broken_utf8() -> None:
    tokenizer = FakeTokenizer()
    assert tokenizer.decode([IM_START, *"İstanbul".encode(), IM_END, END_OF_TEXT]) == "İstanbul"
    assert tokenizer.decode([0xE2, 0x82]) == "\ufffd"


def test_decode_with_specials_shows_them() -> None:
    tokenizer = FakeTokenizer()
    text = "<|im_start|>user\nçay<|im_end|>\n"
    assert tokenizer.decode_with_specials(tokenizer.encode(text)) == text


def test_is_a_model_tokenizer_with_a_chatml_template() -> None:
    tokenizer = FakeTokenizer()
    assert isinstance(tokenizer, ModelTokenizer)
    assert tokenizer.end_token_ids == {IM_END, END_OF_TEXT}
    prompt = build_prompt(GenerationRequest(user_prompt="hi", system_prompt="sys"), tokenizer)
    assert prompt == (
        "<|im_start|>system\nsys<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
