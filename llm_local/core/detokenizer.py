"""Token ids in, text out, one piece at a time, equal in the end to one full decode.

Decoding token by token and concatenating is wrong for most tokenizers: a character
can span tokens (byte-level BPE, sentencepiece byte fallback ``<0xE2>``), and some
decoders depend on position (sentencepiece drops the leading space of the first
token only). So, like vLLM and TGI, each step decodes a small window: the tokens since
the last emission plus the ones that produced it (``prefix_offset``..end), and emits
what that window added beyond the previous window's text. Text is held back while it
ends in U+FFFD (an incomplete UTF-8 sequence: the next token may complete it) or while
the window does not extend the previous text (a decoder that rewrites earlier text).

The window normally holds a handful of tokens, so each token costs one small decode
(two when it completes text).
finish() decodes everything once, checks that what was emitted is a prefix of the
full decode and returns the rest, so concatenating every push() and finish() gives
exactly ``tokenizer.decode(all_ids)``.

Special tokens decode to nothing (ModelTokenizer.decode skips them), so they produce
no text.

Sentencepiece byte fallback needs one more rule. transformers' ByteFallback decoder
turns a run of ``<0xNN>`` pieces into text only as a whole, and a run that is not valid
UTF-8 becomes one U+FFFD per piece, so a later stray byte can rewrite "\n" already
decoded from ``<0x0A>``. A tokenizer that names its byte pieces (an optional
``byte_token_ids`` attribute, see ByteFallbackTokenizer) therefore gets its byte runs
held back until a piece that is not a byte (nor decodes to nothing, like a skipped
special token) ends the run: one token of delay for such characters, and an exact
result. Without the attribute, such a rewrite is detected by finish() and logged.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from llm_local.backends.base import ModelTokenizer

log = logging.getLogger(__name__)

_REPLACEMENT = "\ufffd"


@runtime_checkable
class ByteFallbackTokenizer(Protocol):
    """Optional extra of a ModelTokenizer whose vocabulary has ``<0xNN>`` byte pieces."""

    @property
    def byte_token_ids(self) -> frozenset[int]:
        """Ids of the byte-fallback pieces; empty when there are none."""
        ...


class IncrementalDetokenizer:
    """Text mode: every piece is whole characters (code points)."""

    def __init__(self, tokenizer: ModelTokenizer) -> None:
        self._tokenizer = tokenizer
        self._byte_ids = (
            tokenizer.byte_token_ids
            if isinstance(tokenizer, ByteFallbackTokenizer)
            else frozenset()
        )
        self._in_byte_run = False
        self._ids: list[int] = []
        # ids[_prefix_offset:_read_offset] produced the last emitted piece; it is kept as
        # left context so that the next window decodes the way the full sequence does.
        self._prefix_offset = 0
        self._read_offset = 0
        self._prefix_text = ""
        self._emitted: list[str] = []
        self._finished = False

    @property
    def token_count(self) -> int:
        return len(self._ids)

    def push(self, ids: Sequence[int]) -> str:
        """Add token ids; return the text they completed (often "", never a broken char)."""
        if self._finished:
            raise RuntimeError("push() after finish()")
        # One id at a time, so that a group ending inside a character still releases
        # the whole characters before it.
        return "".join([self._push_one(token_id) for token_id in ids])

    def _push_one(self, token_id: int) -> str:
        self._ids.append(token_id)
        if self._byte_ids and self._byte_run_open(token_id):
            return ""
        window_text = self._tokenizer.decode(self._ids[self._prefix_offset :])
        if (
            len(window_text) <= len(self._prefix_text)
            or window_text.endswith(_REPLACEMENT)
            or not window_text.startswith(self._prefix_text)
        ):
            return ""
        piece = window_text[len(self._prefix_text) :]
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        self._prefix_text = self._tokenizer.decode(
            self._ids[self._prefix_offset : self._read_offset]
        )
        self._emitted.append(piece)
        return piece

    def _byte_run_open(self, token_id: int) -> bool:
        """Whether a run of byte pieces is still open (and may still change) after `token_id`."""
        if token_id in self._byte_ids:
            self._in_byte_run = True
        elif self._in_byte_run and self._adds_no_text():
            pass  # a skipped special token does not end the run in the full decode
        else:
            self._in_byte_run = False
        return self._in_byte_run

    def _adds_no_text(self) -> bool:
        """Whether the last id leaves the decode unchanged (a skipped special token).

        Judged in context, not alone: a lone "▁" also decodes to "" under a decoder that
        strips the first leading space, yet after other pieces it is a real space."""
        window = self._ids[self._prefix_offset :]
        return self._tokenizer.decode(window) == self._tokenizer.decode(window[:-1])

    def finish(self) -> str:
        """The text still held back; after it, the concatenation equals the full decode."""
        if self._finished:
            return ""
        self._finished = True
        full_text = self._tokenizer.decode(self._ids)
        emitted = "".join(self._emitted)
        if full_text.startswith(emitted):
            return full_text[len(emitted) :]
        # Only a decoder whose output depends on distant context gets here; the text is
        # already sent, so say so and send the window's remainder.
        log.warning(
            "incremental decode diverged from the full decode after %d tokens",
            len(self._ids),
        )
        window_text = self._tokenizer.decode(self._ids[self._prefix_offset :])
        return window_text[len(self._prefix_text) :]

    def push_bytes(self, ids: Sequence[int]) -> bytes:
        """Like push(), as UTF-8."""
        return self.push(ids).encode("utf-8")

    def finish_bytes(self) -> bytes:
        """Like finish(), as UTF-8."""
        return self.finish().encode("utf-8")


class IncrementalByteDetokenizer:
    """Bytes mode: the pieces concatenate to the UTF-8 of the full decode.

    ModelTokenizer only decodes to text, so the bytes of a character are known when
    the decode shows that character whole; they are sent then, never earlier or later.
    """

    def __init__(self, tokenizer: ModelTokenizer) -> None:
        self._text = IncrementalDetokenizer(tokenizer)

    @property
    def token_count(self) -> int:
        return self._text.token_count

    def push(self, ids: Sequence[int]) -> bytes:
        return self._text.push(ids).encode("utf-8")

    def finish(self) -> bytes:
        return self._text.finish().encode("utf-8")
