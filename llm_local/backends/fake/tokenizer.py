"""A byte-level tokenizer with ChatML specials: every UTF-8 byte is one token.

Ids 0..255 are the bytes themselves; 256.. are special tokens. A character outside
ASCII therefore spans several tokens, which exercises the detokenizer's handling of
incomplete UTF-8 sequences for free.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

IM_END = 256
IM_START = 257
END_OF_TEXT = 258

SPECIAL_TOKENS = {IM_END: "<|im_end|>", IM_START: "<|im_start|>", END_OF_TEXT: "<|endoftext|>"}
VOCAB_SIZE = 259

# ChatML, without SmolLM's built-in default system prompt.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_SPECIAL_IDS = {text: token_id for token_id, text in SPECIAL_TOKENS.items()}
_SPECIAL_PATTERN = re.compile("(" + "|".join(re.escape(text) for text in _SPECIAL_IDS) + ")")


class FakeTokenizer:
    """Implements ModelTokenizer. `bos_id`: the BOS a plain prompt gets (None: none, as
    SmolLM2's configuration says; tests set one to stand for Llama 3 or Phi-3)."""

    def __init__(self, bos_id: int | None = None) -> None:
        self._bos_id = bos_id

    @property
    def plain_prompt_bos_id(self) -> int | None:
        return self._bos_id

    @property
    def end_token_ids(self) -> frozenset[int]:
        return frozenset({IM_END, END_OF_TEXT})

    @property
    def chat_template(self) -> str | None:
        return CHAT_TEMPLATE

    @property
    def special_tokens(self) -> dict[str, str]:
        return {
            "bos_token": SPECIAL_TOKENS[IM_START],
            "eos_token": SPECIAL_TOKENS[IM_END],
            "pad_token": SPECIAL_TOKENS[IM_END],
            "unk_token": SPECIAL_TOKENS[END_OF_TEXT],
        }

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for part in _SPECIAL_PATTERN.split(text):
            special = _SPECIAL_IDS.get(part)
            if special is not None:
                ids.append(special)
            else:
                ids.extend(part.encode("utf-8"))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(token_id for token_id in ids if token_id < 256).decode(
            "utf-8", errors="replace"
        )

    def decode_with_specials(self, ids: Sequence[int]) -> str:
        """Like decode, but special tokens appear as their text (to read a prompt back)."""
        parts: list[str] = []
        run: list[int] = []
        for token_id in ids:
            if token_id < 256:
                run.append(token_id)
                continue
            parts.append(bytes(run).decode("utf-8", errors="replace"))
            run = []
            parts.append(SPECIAL_TOKENS.get(token_id, ""))
        parts.append(bytes(run).decode("utf-8", errors="replace"))
        return "".join(parts)
