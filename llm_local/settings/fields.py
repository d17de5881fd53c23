"""Every settings key: what values it accepts and how a valid value becomes a typed one.

Pure data and functions, no dynaconf: the loader turns these into dynaconf Validators,
and tests can check a value without loading anything.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import get_args

from llm_local.settings.schema import (
    AttentionImplementation,
    ComputeType,
    Device,
    KvLayout,
    LlamaCppWeights,
    LogFormat,
    PrefixIsolation,
    TorchDType,
)

_TRUE_WORDS = frozenset({"true", "yes", "on", "1"})
_FALSE_WORDS = frozenset({"false", "no", "off", "0"})
LOG_LEVELS = ("CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG")
_LOG_LEVEL_ALIASES = {"WARN": "WARNING", "FATAL": "CRITICAL"}


@dataclass(frozen=True, slots=True)
class Field:
    key: str  # dotted: "server.http_port"
    accepts: Callable[[object], bool]
    allowed: str  # what `accepts` wants, in words, for error messages
    to_typed: Callable[[object], object]  # only called on accepted values


# -- value kinds ---------------------------------------------------------------------


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _identity(value: object) -> object:
    return value


def _to_float(value: object) -> object:
    assert isinstance(value, int | float)
    return float(value)


def integer(key: str, minimum: int, maximum: int | None = None) -> Field:
    allowed = (
        f"an integer from {minimum} to {maximum}"
        if maximum is not None
        else f"an integer >= {minimum}"
    )

    def accepts(value: object) -> bool:
        if not _is_int(value):
            return False
        assert isinstance(value, int)
        return value >= minimum and (maximum is None or value <= maximum)

    return Field(key, accepts, allowed, _identity)


def integer_or_auto(key: str, minimum: int) -> Field:
    def accepts(value: object) -> bool:
        return value == "auto" or (_is_int(value) and int(str(value)) >= minimum)

    def to_typed(value: object) -> object:
        return "auto" if value == "auto" else int(str(value))

    return Field(key, accepts, f'"auto" or an integer >= {minimum}', to_typed)


def number(
    key: str,
    minimum: float,
    *,
    exclusive_minimum: bool = False,
    maximum: float | None = None,
) -> Field:
    low = f"> {minimum:g}" if exclusive_minimum else f">= {minimum:g}"
    allowed = f"a number {low}" + (f" and <= {maximum:g}" if maximum is not None else "")

    def accepts(value: object) -> bool:
        if not _is_number(value):
            return False
        assert isinstance(value, int | float)
        above = value > minimum if exclusive_minimum else value >= minimum
        return above and (maximum is None or value <= maximum)

    return Field(key, accepts, allowed, _to_float)


def boolean(key: str) -> Field:
    def accepts(value: object) -> bool:
        if isinstance(value, bool):
            return True
        if _is_int(value):
            return value in (0, 1)
        return isinstance(value, str) and value.strip().lower() in _TRUE_WORDS | _FALSE_WORDS

    def to_typed(value: object) -> object:
        if isinstance(value, str):
            return value.strip().lower() in _TRUE_WORDS
        return bool(value)

    return Field(key, accepts, "true or false", to_typed)


def choice(key: str, choices: Iterable[str]) -> Field:
    options = tuple(choices)

    def accepts(value: object) -> bool:
        return isinstance(value, str) and value.strip().lower() in options

    def to_typed(value: object) -> object:
        assert isinstance(value, str)
        return value.strip().lower()

    return Field(key, accepts, f"one of {', '.join(options)}", to_typed)


def text(key: str) -> Field:
    def accepts(value: object) -> bool:
        return isinstance(value, str) and bool(value.strip())

    def to_typed(value: object) -> object:
        assert isinstance(value, str)
        return value.strip()

    return Field(key, accepts, "a non-empty string", to_typed)


def optional_text(key: str) -> Field:
    def to_typed(value: object) -> object:
        return value.strip() or None if isinstance(value, str) else None

    return Field(key, _is_optional_string, 'a string ("" = unset)', to_typed)


def text_list(key: str) -> Field:
    """A list of strings, or one string of comma-separated items (so that an environment
    variable can hold several); blank items are dropped."""

    def items(value: object) -> list[object]:
        if isinstance(value, str):
            return list(value.split(","))
        assert isinstance(value, list | tuple)
        return list(value)

    def accepts(value: object) -> bool:
        if isinstance(value, str):
            return True
        return isinstance(value, list | tuple) and all(isinstance(item, str) for item in value)

    def to_typed(value: object) -> object:
        return tuple(str(item).strip() for item in items(value) if str(item).strip())

    return Field(key, accepts, "a list of strings or one comma-separated string", to_typed)


def _is_optional_string(value: object) -> bool:
    return value is None or isinstance(value, str)


def absolute_path(value: str) -> Path:
    """Relative paths mean "relative to where the command runs", fixed at load time."""
    return Path(value).expanduser().absolute()


def directory(key: str) -> Field:
    def to_typed(value: object) -> object:
        assert isinstance(value, str)
        return absolute_path(value.strip())

    return Field(key, text(key).accepts, "a directory path", to_typed)


def optional_path(key: str) -> Field:
    def to_typed(value: object) -> object:
        if not isinstance(value, str) or not value.strip():
            return None
        return absolute_path(value.strip())

    return Field(key, _is_optional_string, 'a file path ("" = unset)', to_typed)


def log_level(key: str) -> Field:
    def normalized(value: object) -> str | None:
        if not isinstance(value, str):
            return None
        upper = value.strip().upper()
        upper = _LOG_LEVEL_ALIASES.get(upper, upper)
        return upper if upper in LOG_LEVELS else None

    def to_typed(value: object) -> object:
        return normalized(value)

    return Field(
        key,
        lambda value: normalized(value) is not None,
        f"one of {', '.join(LOG_LEVELS)}",
        to_typed,
    )


def model_source(key: str) -> Field:
    """A hub id, a path, or "package:DIST/PATH"; the convert step checks it exists."""

    def accepts(value: object) -> bool:
        if not isinstance(value, str) or not value.strip():
            return False
        spec = value.strip()
        if spec.startswith("package:"):
            dist, _, inner = spec.removeprefix("package:").partition("/")
            return bool(dist) and bool(inner)
        return True

    return Field(
        key,
        accepts,
        'a hub repo id, a model directory, a .gguf file or "package:DIST/PATH"',
        text(key).to_typed,
    )


# -- the keys ------------------------------------------------------------------------

DEVICES: tuple[str, ...] = get_args(Device)
COMPUTE_TYPES: tuple[str, ...] = get_args(ComputeType)
LOG_FORMATS: tuple[str, ...] = get_args(LogFormat)
TORCH_DTYPES: tuple[str, ...] = get_args(TorchDType)
ATTENTION_IMPLEMENTATIONS: tuple[str, ...] = get_args(AttentionImplementation)
_PORT_MAX = 65535
_MESSAGE_MAX = 2**32 - 1  # a gRPC length prefix is 32 bits
_HTTP2_SETTING_MAX = 2**31 - 1  # HTTP/2 settings values are 31-bit in practice (h2)

FIELDS: tuple[Field, ...] = (
    text("backend"),
    model_source("model.name"),
    optional_text("model.revision"),
    choice("model.quantization", COMPUTE_TYPES),
    directory("model.cache_dir"),
    optional_path("model.download_dir"),
    boolean("model.offline"),
    integer("model.context_limit", 0),
    integer("model.load_retries", 0),
    number("model.load_retry_backoff_s", 0),
    boolean("model.convert_on_start"),
    choice("runtime.device", DEVICES),
    integer("runtime.device_index", 0),
    choice("runtime.compute_type", COMPUTE_TYPES),
    integer_or_auto("runtime.inter_threads", 1),
    integer_or_auto("runtime.intra_threads", 0),
    integer("runtime.max_batch_size", 1),
    number("runtime.batch_wait_ms", 0),
    number("runtime.busy_batch_wait_ms", 0),
    number("runtime.ttft_target_ms", 0),
    number("runtime.prefix_cache_mb", 0),
    choice("transformers.dtype", TORCH_DTYPES),
    choice("transformers.attn_implementation", ATTENTION_IMPLEMENTATIONS),
    integer("transformers.max_requests_per_batch", 1),
    integer("transformers.max_batch_tokens", 0),
    integer("transformers.kv_cache_tokens", 0),
    integer_or_auto("transformers.threads", 1),
    integer_or_auto("transformers.page_tokens", 4),  # transformers' own minimum
    number("transformers.prefix_cache_mb", 0),
    choice("transformers.prefix_isolation", get_args(PrefixIsolation)),
    boolean("transformers.keep_dequantized"),
    integer("llama_cpp.kv_cache_tokens", 0),
    choice("llama_cpp.kv_layout", get_args(KvLayout)),
    integer("llama_cpp.sequences", 1),
    integer("llama_cpp.prefill_chunk_tokens", 1),
    integer("llama_cpp.gpu_layers", 0),
    integer_or_auto("llama_cpp.threads", 1),
    boolean("llama_cpp.repack"),
    choice("llama_cpp.weights", get_args(LlamaCppWeights)),
    number("llama_cpp.prefix_cache_mb", 0),
    choice("llama_cpp.prefix_isolation", get_args(PrefixIsolation)),
    number("numerics.max_nll_ratio", 1),
    number("numerics.min_agreement_ratio", 0, maximum=1),
    boolean("numerics.accept_unverified"),
    boolean("numerics.check_at_load"),
    optional_path("numerics.verdict_dir"),
    integer("generation.max_new_tokens", 1),
    integer("generation.max_new_tokens_limit", 1),
    number("generation.temperature", 0),
    integer("generation.top_k", 0),
    number("generation.top_p", 0, exclusive_minimum=True, maximum=1),
    number("generation.repetition_penalty", 0, exclusive_minimum=True),
    integer("generation.max_stop_sequences", 0),
    integer("generation.max_stop_sequence_length", 1),
    integer("generation.max_schema_bytes", 1),
    integer("generation.max_schema_depth", 1),
    integer("generation.max_tools", 1),
    integer("capacity.max_concurrent", 1),
    integer("capacity.max_queued", 0),
    number("capacity.queue_timeout_s", 0, exclusive_minimum=True),
    integer("capacity.max_per_tenant", 0),
    text("server.host"),
    integer("server.http_port", 0, _PORT_MAX),
    integer("server.grpc_port", 0, _PORT_MAX),
    integer("server.metrics_port", 0, _PORT_MAX),
    boolean("server.require_tenant_id"),
    number("server.grace_period_s", 0),
    number("server.slow_start_s", 0),
    number("server.stall_timeout_s", 0, exclusive_minimum=True),
    integer("server.metrics_tenant_labels", 0),
    number("server.grpc_max_connection_age_s", 0),
    number("server.grpc_max_connection_age_grace_s", 0),
    optional_path("tls.cert_path"),
    optional_path("tls.key_path"),
    optional_path("tls.ca_path"),
    text_list("openai.api_keys"),
    optional_text("openai.model_id"),
    integer("openai.max_body_bytes", 1024),
    integer("openai.max_messages", 1),
    integer("openai.max_prompt_chars", 1),
    # Floors: below them no ordinary request fits (a gateway's metadata alone is ~1 KiB).
    integer("limits.grpc_max_message_bytes", 1024, _MESSAGE_MAX),
    integer("limits.grpc_max_metadata_bytes", 1024, _HTTP2_SETTING_MAX),
    integer("limits.grpc_max_concurrent_streams", 1, _HTTP2_SETTING_MAX),
    integer("limits.http_max_concurrent_streams", 1, _HTTP2_SETTING_MAX),
    integer("limits.http_max_header_bytes", 1024, _HTTP2_SETTING_MAX),
    log_level("logging.level"),
    choice("logging.format", LOG_FORMATS),
    boolean("logging.log_prompts"),
)

FIELDS_BY_KEY: dict[str, Field] = {field.key: field for field in FIELDS}
TABLES: tuple[str, ...] = tuple(dict.fromkeys(f.key.split(".")[0] for f in FIELDS if "." in f.key))
TOP_LEVEL_KEYS: tuple[str, ...] = tuple(f.key for f in FIELDS if "." not in f.key)
