"""Hide secrets before settings leave the process (/config, `llm-local settings`)."""

from __future__ import annotations

import re
from collections.abc import Mapping

REDACTED = "***"
# Names that mean "the value is a secret". Paths to key files (tls.key_path) are not
# secrets; the key material inside them is, and is caught by _PEM_PRIVATE below.
# Whole words between underscores, so `hf_token` is a secret but `max_new_tokens` is not.
_SECRET_NAME = re.compile(
    r"(?:^|_)(?:token|secret|password|passwd|api_?keys?|private(?:_?key)?|credentials?)(?:_|$)",
    re.I,
)
_PEM_PRIVATE = re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----")


def is_secret(key: str, value: object) -> bool:
    if _SECRET_NAME.search(key):
        return True
    return isinstance(value, str) and bool(_PEM_PRIVATE.search(value))


def redact(raw: Mapping[str, object]) -> dict[str, object]:
    """A copy of `raw` with every secret value replaced by "***", at any depth."""
    return {str(key): _redact_value(str(key), value) for key, value in raw.items()}


def _is_set(value: object) -> bool:
    # An unset secret ("", no keys) is shown as such: knowing that none is set is no leak.
    return value is not None and value != "" and value != () and value != []


def _redact_value(key: str, value: object) -> object:
    if _is_set(value) and is_secret(key, value):
        return REDACTED
    if isinstance(value, Mapping):
        return redact(value)
    if isinstance(value, list | tuple):
        return [_redact_value(key, item) for item in value]
    return value
