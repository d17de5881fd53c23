"""llguidance, the grammar engine of structured output: constraint -> grammar -> token masks.

Why llguidance (docs/FINDINGS.md, "Structured output"): no dependencies (xgrammar pulls
torch, triton and transformers into an image that has none of them), it names the schema
feature it cannot enforce instead of relaxing it, and on SmolLM2's 49k vocabulary a mask
took 6 µs at the median and 150 µs at p99 over JSONSchemaBench schemas (compile: 2 ms
median). It ships the bridges from a llama.cpp vocabulary (`tokenizer_for_llama_cpp`) and
from a Hugging Face tokenizer.json (`tokenizer_for_hf`, the transformers backend's).

`GrammarCompiler` is what core sees as the backend's `ConstraintChecker`: it compiles a
constraint once (an LRU cache bounded by `cache_size`) and says why it refuses one.
`TokenMask` is one request's matcher: `compute` the next step's mask (the GIL is
released meanwhile, so it runs beside the model's forward pass), `apply` it to a row of
logits, `accept` the sampled token. End tokens are allowed only where the grammar accepts.
"""

from __future__ import annotations

import ctypes
import json
import logging
import re
import threading
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

import numpy as np
import numpy.typing as npt

from llm_local.core.structured import tools as fmt
from llm_local.core.structured.constraint import OutputConstraint, ToolMode

# The layout tools.py reads back: fixed separators, no whitespace outside strings.
JSON_OPTIONS = {
    "whitespace_flexible": False,
    "item_separator": fmt.ITEM_SEPARATOR,
    "key_separator": fmt.KEY_SEPARATOR,
}
GRAMMAR_CACHE_SIZE = 256
# JSON Schema makes `format` an annotation unless a validator is asked to assert it
# (validators, `jsonschema` included, do not by default), and llama.cpp's and vLLM's
# grammars leave formats they do not know unchecked: a format llguidance does not know is
# dropped and the string left free, rather than the schema refused (15 of the 300
# JSONSchemaBench schemas named one: "url", "uri-reference", ...). Known formats stay
# enforced.
UNKNOWN_FORMAT = re.compile(r"Unknown format: ?([^\s]*)")
MAX_UNKNOWN_FORMATS = 16
# Keywords whose values are JSON data, not schemas: a "format" key in them is data.
DATA_KEYWORDS = frozenset({"const", "enum", "default", "examples"})

log = logging.getLogger(__name__)


class StructuredOutputUnavailable(RuntimeError):
    """llguidance is not installed: pip install 'llm-local[structured]'."""


def _llguidance() -> Any:
    try:
        import llguidance
    except ImportError as exc:
        raise StructuredOutputUnavailable(
            "structured output needs llguidance: pip install 'llm-local[structured]'"
        ) from exc
    return llguidance


def available() -> bool:
    try:
        _llguidance()
    except StructuredOutputUnavailable:
        return False
    return True


def tokenizer_for_llama_cpp(lib: Any, vocab: Any, end_token_ids: Iterable[int]) -> Any:
    """An llguidance tokenizer over a llama.cpp model's own vocabulary: each token's bytes
    read through the library (control tokens marked with a leading 0xff, llguidance's
    convention, so that no grammar ever spells them), the library's own tokenizer, and
    the model's end-of-generation ids as its end tokens. Once, at load."""
    llguidance = _llguidance()
    count = int(lib.llama_vocab_n_tokens(vocab))
    capacity = 1024
    buffer = ctypes.create_string_buffer(capacity)
    control = lib.LLAMA_TOKEN_ATTR_CONTROL
    user_defined = lib.LLAMA_TOKEN_ATTR_USER_DEFINED
    pieces: list[bytes] = []
    for token in range(count):
        length = int(lib.llama_token_to_piece(vocab, token, buffer, capacity, 0, True))
        if length < 0:
            raise ValueError(f"token {token} is longer than {capacity} bytes")
        piece = buffer.raw[:length]
        attributes = int(lib.llama_vocab_get_attr(vocab, token))
        if attributes & control or (
            attributes & user_defined and piece.startswith(b"<") and piece.endswith(b">")
        ):
            piece = b"\xff" + piece
        pieces.append(piece)
    tokenize = ctypes.cast(lib.llama_cpp._lib.llama_tokenize, ctypes.c_void_p).value
    return llguidance.LLTokenizer.from_llamacpp(
        tokens=pieces,
        vocab_ptr=vocab,
        tokenize_fptr=tokenize,
        eos_token=sorted(end_token_ids),
        slices=None,
    )


def tokenizer_for_hf(tokenizer_json: str, vocab_size: int, end_token_ids: Iterable[int]) -> Any:
    """An llguidance tokenizer over a Hugging Face `tokenizers` vocabulary (its tokenizer.json
    text; special tokens are known as such, so that no grammar spells them), with the
    model's end-of-generation ids as its end tokens. Once, at load."""
    llguidance = _llguidance()
    return llguidance.LLTokenizer(
        tokenizer_json, n_vocab=vocab_size, eos_token=sorted(end_token_ids)
    )


def grammar_text(constraint: OutputConstraint, unchecked: frozenset[str] = frozenset()) -> str:
    """The llguidance grammar (its JSON form) of a constraint, the `unchecked` formats
    left out of its schemas."""
    llguidance = _llguidance()
    matcher = llguidance.LLMatcher
    if not constraint.is_tool_call:
        schema = without_formats(json.loads(constraint.schema or "{}"), unchecked)
        return str(matcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS))
    return str(matcher.grammar_from_lark(_tools_lark(constraint, unchecked)))


def without_formats(schema: Any, formats: frozenset[str]) -> Any:
    """`schema` without its `"format": F` annotations for F in `formats` (data under
    const, enum, default and examples left as it is)."""
    if not formats:
        return schema
    if isinstance(schema, list):
        return [without_formats(item, formats) for item in schema]
    if not isinstance(schema, dict):
        return schema
    return {
        key: value if key in DATA_KEYWORDS else without_formats(value, formats)
        for key, value in schema.items()
        if not (key == "format" and isinstance(value, str) and value in formats)
    }


def _tools_lark(constraint: OutputConstraint, unchecked: frozenset[str]) -> str:
    calls = [
        {
            "type": "object",
            "properties": {
                "name": {"const": tool.name},
                "arguments": without_formats(tool.parameters_schema(), unchecked),
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for tool in constraint.tools
    ]
    body = calls[0] if len(calls) == 1 else {"anyOf": calls}
    body = {**body, "x-guidance": JSON_OPTIONS}
    repeat = f"({_lark_string(fmt.CALL_SEPARATOR)} call)*" if constraint.parallel else ""
    rules = [
        f"calls: call {repeat}",
        f"call: {_lark_string(fmt.CALL_OPEN)} body {_lark_string(fmt.CALL_CLOSE)}",
        f"body: %json {json.dumps(body)}",
    ]
    if constraint.mode is ToolMode.AUTO:
        rules.insert(0, "start: calls | TEXT")
        rules.append(f"TEXT: /{fmt.TEXT_FIRST_CHARACTER}(.|\\n)*/")
    else:
        rules.insert(0, "start: calls")
    return "\n".join(rules) + "\n"


def _lark_string(text: str) -> str:
    return json.dumps(text)  # a lark string literal is a JSON string literal here


class GrammarCompiler:
    """Compiled grammars by constraint (bounded LRU); thread-safe."""

    def __init__(self, tokenizer: Any, cache_size: int = GRAMMAR_CACHE_SIZE) -> None:
        self._llguidance = _llguidance()
        self._tokenizer = tokenizer
        self.vocab_size = int(tokenizer.vocab_size)
        self._cache: OrderedDict[OutputConstraint, str | Exception] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def _compiled(self, constraint: OutputConstraint) -> str | Exception:
        with self._lock:
            cached = self._cache.get(constraint)
            if cached is not None:
                self._cache.move_to_end(constraint)
                return cached
        result = self._compile(constraint)
        with self._lock:
            self._cache[constraint] = result
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return result

    def _compile(self, constraint: OutputConstraint) -> str | Exception:
        unchecked: frozenset[str] = frozenset()
        try:
            while True:
                grammar = grammar_text(constraint, unchecked)
                error = self._llguidance.LLMatcher.validate_grammar(grammar, self._tokenizer)
                unknown = UNKNOWN_FORMAT.search(error or "")
                if (
                    unknown is None
                    or unknown.group(1) in unchecked  # still there: not an annotation we drop
                    or len(unchecked) >= MAX_UNKNOWN_FORMATS
                ):
                    break
                unchecked |= {unknown.group(1)}
        except (ValueError, TypeError, RuntimeError) as exc:
            return exc
        if error:
            return ValueError(error)
        if unchecked:
            log.info(
                "structured output: format %s not known to the grammar engine, left "
                "unchecked (an annotation, as JSON Schema has it)",
                ", ".join(sorted(unchecked)),
            )
        return grammar

    def is_compiled(self, constraint: OutputConstraint) -> bool:
        """`ConstraintChecker`: the constraint's grammar (or refusal) is in the cache."""
        with self._lock:
            return constraint in self._cache

    def refusal(self, constraint: OutputConstraint) -> str | None:
        """`ConstraintChecker`: None, or the engine's reason naming the feature."""
        result = self._compiled(constraint)
        if isinstance(result, Exception):
            return _first_line(str(result))
        return None

    def matcher(self, constraint: OutputConstraint) -> TokenMask:
        result = self._compiled(constraint)
        if isinstance(result, Exception):
            raise ValueError(_first_line(str(result)))
        return TokenMask(self._llguidance.LLMatcher(self._tokenizer, result), self.vocab_size)


def _first_line(message: str) -> str:
    """llguidance's messages carry a trace after the first line ("while processing …")."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    return "; ".join(lines[:2]) if lines else "the engine refused the schema"


class TokenMask:
    """One request's grammar state: which tokens may come next."""

    def __init__(self, matcher: Any, vocab_size: int) -> None:
        self._matcher = matcher
        self._vocab_size = vocab_size
        self._allowed: npt.NDArray[np.bool_] | None = None

    def compute(self) -> None:
        """The next step's mask (llguidance releases the GIL while it computes)."""
        bits = np.frombuffer(self._matcher.compute_bitmask(), dtype=np.uint8)
        self._allowed = np.unpackbits(bits, bitorder="little")[: self._vocab_size].astype(bool)

    def allowed(self) -> npt.NDArray[np.bool_]:
        """Which tokens may come next, one flag per vocabulary token (`compute` first, or
        it computes here)."""
        if self._allowed is None:
            self.compute()
        assert self._allowed is not None
        return self._allowed

    def apply(self, logits: npt.NDArray[np.float32]) -> None:
        """Forbid in place what the grammar does not allow next (`compute` first)."""
        allowed = self.allowed()[: logits.shape[0]]
        logits[: allowed.shape[0]][~allowed] = -np.inf
        logits[allowed.shape[0] :] = -np.inf

    def accept(self, token: int) -> bool:
        """Advance by the sampled token; False if the grammar rejects it (a bug or an
        end token where the grammar is complete)."""
        self._allowed = None
        return bool(self._matcher.consume_token(token))

    @property
    def error(self) -> str | None:
        return str(self._matcher.get_error()) if self._matcher.is_error() else None
