"""A Hugging Face tokenizer read straight from a model directory with `tokenizers`.

Serving needs only ``tokenizer.json`` and two small JSON files, so this avoids importing
transformers (seconds of start-up, hundreds of MB) at serve time. The directory is the
converted model's: the converter copies the tokenizer files beside ``model.bin``.

What it reads:
- ``tokenizer.json``: the tokenizer itself.
- the chat template: ``chat_template.jinja`` when present (transformers 4.43+ writes it
  there), else ``tokenizer_config.json["chat_template"]`` (a string, or a list of
  ``{"name", "template"}`` entries of which the one named ``default`` is used).
- ``tokenizer_config.json``: the special tokens (bos/eos/unk/pad) the template may use.
- ``generation_config.json``: ``eos_token_id`` (one id or a list) ends a turn.
- whether a plain prompt starts with the BOS: ``tokenizer_config.json["add_bos_token"]``
  when it says (transformers writes the GGUF's ``tokenizer.ggml.add_bos_token`` there),
  else whether ``tokenizer.json``'s post-processor puts a token before the text (Llama 3
  configures ``<|begin_of_text|>`` only there).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from tokenizers import Tokenizer

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
GENERATION_CONFIG_FILE = "generation_config.json"

SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")

# End-of-turn markers of common chat formats (ChatML, Llama 3, Phi-3, Gemma, GPT-2 style).
# Whichever of them the vocabulary holds ends generation, even when the model's own
# configuration names only its document-level eos.
WELL_KNOWN_END_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")

# Byte-fallback pieces of sentencepiece-style vocabularies (Llama 2, Mistral, Phi-3).
BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


class TokenizerLoadError(Exception):
    """The tokenizer files are missing or malformed; the message names the file."""


class HFTokenizer:
    """`ModelTokenizer` over a `tokenizers.Tokenizer` plus the model's JSON metadata."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        chat_template: str | None,
        special_tokens: Mapping[str, str],
        generation_eos_ids: Iterable[int] = (),
        plain_prompt_bos_id: int | None = None,
    ) -> None:
        self._tokenizer = tokenizer
        self._plain_prompt_bos_id = plain_prompt_bos_id
        self._chat_template = chat_template
        self._special_tokens = dict(special_tokens)
        self._end_token_ids = _collect_end_token_ids(
            tokenizer, special_tokens.get("eos_token"), generation_eos_ids
        )
        # The detokenizer holds runs of these back until they form whole characters
        # (core.detokenizer.ByteFallbackTokenizer); byte-level BPE vocabularies have none.
        self._byte_token_ids = frozenset(
            token_id
            for token, token_id in tokenizer.get_vocab(with_added_tokens=False).items()
            if BYTE_PIECE.fullmatch(token)
        )

    @classmethod
    def from_directory(cls, model_dir: Path | str) -> HFTokenizer:
        """Read the tokenizer of the model in `model_dir`; TokenizerLoadError if unusable."""
        directory = Path(model_dir)
        tokenizer_path = directory / TOKENIZER_FILE
        if not tokenizer_path.is_file():
            raise TokenizerLoadError(f"{tokenizer_path} is missing")
        try:
            tokenizer = Tokenizer.from_file(str(tokenizer_path))
        except Exception as exc:  # tokenizers raises plain Exception subclasses
            raise TokenizerLoadError(f"{tokenizer_path} cannot be read: {exc}") from exc
        config = _read_json_object(directory / TOKENIZER_CONFIG_FILE)
        generation_config = _read_json_object(directory / GENERATION_CONFIG_FILE)
        special_tokens = _special_tokens(config)
        return cls(
            tokenizer,
            chat_template=_read_chat_template(directory, config),
            special_tokens=special_tokens,
            generation_eos_ids=_as_id_list(generation_config.get("eos_token_id")),
            plain_prompt_bos_id=_plain_prompt_bos_id(
                tokenizer, config.get("add_bos_token"), special_tokens.get("bos_token")
            ),
        )

    @property
    def end_token_ids(self) -> frozenset[int]:
        return self._end_token_ids

    @property
    def byte_token_ids(self) -> frozenset[int]:
        return self._byte_token_ids

    @property
    def chat_template(self) -> str | None:
        return self._chat_template

    @property
    def special_tokens(self) -> dict[str, str]:
        return dict(self._special_tokens)

    @property
    def plain_prompt_bos_id(self) -> int | None:
        return self._plain_prompt_bos_id

    @property
    def vocab_size(self) -> int:
        return int(self._tokenizer.get_vocab_size(with_added_tokens=True))

    def to_json(self) -> str:
        """The whole tokenizer as tokenizer.json text (what a grammar engine reads)."""
        text: str = self._tokenizer.to_str()
        return text

    def encode(self, text: str) -> list[int]:
        # The chat template already placed bos and friends: adding them again would
        # double them. Special tokens spelled in `text` still become their ids.
        ids: list[int] = self._tokenizer.encode(text, add_special_tokens=False).ids
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        text: str = self._tokenizer.decode(list(ids), skip_special_tokens=True)
        return text

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        """Token strings of `ids`: what CTranslate2's generate_batch takes as input."""
        id_to_token = self._tokenizer.id_to_token
        tokens: list[str] = []
        for token_id in ids:
            token = id_to_token(token_id)
            if token is None:
                raise ValueError(f"token id {token_id} is outside the vocabulary")
            tokens.append(token)
        return tokens


def _collect_end_token_ids(
    tokenizer: Tokenizer, eos_text: str | None, generation_eos_ids: Iterable[int]
) -> frozenset[int]:
    ids = set(generation_eos_ids)
    for text in (eos_text, *WELL_KNOWN_END_TOKENS):
        if text is None:
            continue
        token_id = tokenizer.token_to_id(text)
        if token_id is not None:
            ids.add(token_id)
    return frozenset(ids)


def _plain_prompt_bos_id(
    tokenizer: Tokenizer, add_bos_token: object, bos_text: str | None
) -> int | None:
    """The BOS a plain prompt starts with (module docstring), or None."""
    if isinstance(add_bos_token, bool):
        if not add_bos_token or bos_text is None:
            return None
        bos_id: int | None = tokenizer.token_to_id(bos_text)
        return bos_id
    # No flag: ask the post-processor what it adds around a text, and keep a single
    # token it puts in front (a BOS); what it may add after (an EOS) a completion never
    # wants, and llama.cpp and vLLM's servers would not add it either by this rule.
    bare: list[int] = tokenizer.encode("a", add_special_tokens=False).ids
    framed: list[int] = tokenizer.encode("a", add_special_tokens=True).ids
    if len(framed) > len(bare) and framed[1 : 1 + len(bare)] == bare:
        return framed[0]
    return None


def _read_json_object(path: Path) -> dict[str, object]:
    """The JSON object in `path`, or {} when the file does not exist."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise TokenizerLoadError(f"{path} cannot be read: {exc}") from exc
    if not isinstance(data, dict):
        raise TokenizerLoadError(f"{path} does not hold a JSON object")
    return data


def _read_chat_template(directory: Path, config: Mapping[str, object]) -> str | None:
    template_path = directory / CHAT_TEMPLATE_FILE
    if template_path.is_file():
        return template_path.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, str):
        return template
    if isinstance(template, list):
        # Several named templates (e.g. "default", "tool_use"): serving uses "default".
        for entry in template:
            if isinstance(entry, dict) and entry.get("name") == "default":
                value = entry.get("template")
                return value if isinstance(value, str) else None
    return None


def _special_tokens(config: Mapping[str, object]) -> dict[str, str]:
    tokens: dict[str, str] = {}
    for name in SPECIAL_TOKEN_NAMES:
        value = config.get(name)
        # Older configs store an AddedToken as {"content": "<s>", "lstrip": false, ...}.
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            tokens[name] = value
    return tokens


def _as_id_list(value: object) -> list[int]:
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [item for item in value if isinstance(item, int) and not isinstance(item, bool)]
    return []
