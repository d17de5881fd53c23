"""The model's own tokenizer as llama.cpp runs it: the GGUF's vocabulary and chat template.

Why the library's vocabulary and not `HFTokenizer`: the GGUF is the whole model here (no
conversion writes tokenizer.json beside it), and transformers' GGUF reader would import
torch and take seconds at every start. The library tokenizes exactly as llama.cpp's own
server does for this file. The chat template is the GGUF's ``tokenizer.chat_template``,
rendered by core like every backend's.

`encode` parses special tokens spelled in the text (the template writes ``<|im_start|>``)
and adds nothing (the template placed bos). `decode` skips special tokens.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from typing import Any

# Names the chat template may use, read from the vocabulary's special ids.
_SPECIAL_IDS = {"bos_token": "llama_vocab_bos", "eos_token": "llama_vocab_eos"}


class LlamaVocabTokenizer:
    """`ModelTokenizer` over a loaded model's `llama_vocab`."""

    def __init__(self, lib: Any, model: Any, vocab: Any) -> None:
        self._lib = lib
        self._vocab = vocab
        self.vocab_size = int(lib.llama_vocab_n_tokens(vocab))
        template = lib.llama_model_chat_template(model, None)
        self._chat_template = template.decode("utf-8") if template else None
        self._special_tokens: dict[str, str] = {}
        for name, getter in _SPECIAL_IDS.items():
            token = int(getattr(lib, getter)(vocab))
            if token >= 0:
                self._special_tokens[name] = self._text(token)
        # The GGUF's tokenizer.ggml.add_bos_token: a plain (template-less) prompt starts with
        # bos when it asks for one (main's ModelTokenizer.plain_prompt_bos_id, issue 26).
        bos = int(lib.llama_vocab_bos(vocab))
        self._plain_prompt_bos_id = bos if bos >= 0 and lib.llama_vocab_get_add_bos(vocab) else None
        # Every end-of-generation token the vocabulary marks (eos, eot, <|im_end|>, ...).
        self._end_token_ids = frozenset(
            token for token in range(self.vocab_size) if lib.llama_vocab_is_eog(vocab, token)
        )

    @property
    def end_token_ids(self) -> frozenset[int]:
        return self._end_token_ids

    @property
    def plain_prompt_bos_id(self) -> int | None:
        return self._plain_prompt_bos_id

    @property
    def chat_template(self) -> str | None:
        return self._chat_template

    @property
    def special_tokens(self) -> dict[str, str]:
        return dict(self._special_tokens)

    def encode(self, text: str) -> list[int]:
        data = text.encode("utf-8")
        capacity = len(data) + 8
        for _ in range(2):
            tokens = (ctypes.c_int32 * capacity)()
            count = int(
                self._lib.llama_tokenize(
                    self._vocab, data, len(data), tokens, capacity, False, True
                )
            )
            if count >= 0:
                return list(tokens[:count])
            capacity = -count  # too small: the library says how many it needs
        raise RuntimeError("llama_tokenize disagreed with itself about the token count")

    def decode(self, ids: Sequence[int]) -> str:
        if not ids:
            return ""
        tokens = (ctypes.c_int32 * len(ids))(*ids)
        capacity = 8 * len(ids) + 16
        for _ in range(2):
            buffer = ctypes.create_string_buffer(capacity)
            # remove_special=False: keep a leading bos' text out by unparse_special=False.
            length = int(
                self._lib.llama_detokenize(
                    self._vocab, tokens, len(ids), buffer, capacity, False, False
                )
            )
            if length >= 0:
                return buffer.raw[:length].decode("utf-8", errors="replace")
            capacity = -length
        raise RuntimeError("llama_detokenize disagreed with itself about the text length")

    def _text(self, token: int) -> str:
        raw = self._lib.llama_vocab_get_text(self._vocab, token)
        return raw.decode("utf-8", errors="replace") if raw else ""
