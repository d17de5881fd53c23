"""Checks that span several keys or look outside the settings (files, installed plugins).

They run on values that already passed their per-key checks (fields.py), so they may
assume types; each returns problems instead of raising, to report everything at once.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from llm_local.settings.errors import Problem
from llm_local.settings.fields import FIELDS_BY_KEY, TABLES, TOP_LEVEL_KEYS

TypedValues = Mapping[str, object]  # dotted key -> typed value


def unknown_keys(tree: Mapping[str, object]) -> list[Problem]:
    """Keys inside our tables that no code reads: almost always a typo."""
    problems: list[Problem] = []
    for table in TABLES:
        content = tree.get(table)
        if content is None:
            continue
        if not isinstance(content, Mapping):
            problems.append(Problem(table, content, "a table of settings"))
            continue
        known = sorted(k.split(".", 1)[1] for k in FIELDS_BY_KEY if k.startswith(f"{table}."))
        for key, value in content.items():
            if f"{table}.{key}" not in FIELDS_BY_KEY:
                problems.append(
                    Problem(
                        f"{table}.{key}", value, f"unknown key; [{table}] has {', '.join(known)}"
                    )
                )
    return problems


def known_top_level(key: str) -> bool:
    return key in TOP_LEVEL_KEYS or key in TABLES or key == ADAPTERS_TABLE


ADAPTERS_TABLE = "adapters"
# An adapter id travels in a model id ("base:adapter") and in a metrics label: no colon,
# nothing a URL or a label would need to escape.
_ADAPTER_ID = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


def adapter_table(content: object) -> tuple[dict[str, str], list[Problem]]:
    """[adapters]: adapter id -> source (a non-empty string). Ids are lower-cased (the
    settings' keys are case-insensitive) and checked for characters a model id or a
    metrics label cannot carry; sources are checked to exist by `llm-local convert`."""
    if content is None:
        return {}, []
    if not isinstance(content, Mapping):
        return {}, [Problem(ADAPTERS_TABLE, content, "a table: adapter id = source")]
    table: dict[str, str] = {}
    problems: list[Problem] = []
    for raw_id, source in content.items():
        adapter_id = str(raw_id).strip().lower()
        key = f"{ADAPTERS_TABLE}.{raw_id}"
        if not _ADAPTER_ID.match(adapter_id):
            problems.append(
                Problem(
                    key,
                    source,
                    "an adapter id of letters, digits, '.', '_' or '-' (at most 64, "
                    "starting with a letter or digit)",
                )
            )
        elif not isinstance(source, str) or not source.strip():
            problems.append(
                Problem(
                    key,
                    source,
                    "a PEFT adapter directory, a hub repo id, a .gguf LoRA file or "
                    '"package:DIST/PATH"',
                )
            )
        else:
            table[adapter_id] = source.strip()
    return dict(sorted(table.items())), problems


def generation_limits(values: TypedValues) -> list[Problem]:
    default = values["generation.max_new_tokens"]
    limit = values["generation.max_new_tokens_limit"]
    assert isinstance(default, int) and isinstance(limit, int)
    if default > limit:
        return [
            Problem(
                "generation.max_new_tokens",
                default,
                f"must not exceed generation.max_new_tokens_limit ({limit})",
            )
        ]
    return []


def distinct_ports(values: TypedValues) -> list[Problem]:
    """Two listeners on one port fail at bind time, after the model has loaded."""
    problems: list[Problem] = []
    seen: dict[int, str] = {}
    for key in ("server.http_port", "server.grpc_port", "server.metrics_port"):
        port = values[key]
        assert isinstance(port, int)
        if port == 0:  # 0: an ephemeral port (or, for metrics, none of its own)
            continue
        if port in seen:
            problems.append(Problem(key, port, f"must differ from {seen[port]}"))
        else:
            seen[port] = key
    return problems


def tls_files(values: TypedValues) -> list[Problem]:
    cert, key, ca = values["tls.cert_path"], values["tls.key_path"], values["tls.ca_path"]
    problems: list[Problem] = []
    if (cert is None) != (key is None):
        missing, present = ("tls.key_path", cert) if key is None else ("tls.cert_path", key)
        problems.append(
            Problem(missing, "", f"set both tls.cert_path and tls.key_path, or neither ({present})")
        )
    if ca is not None and cert is None:
        problems.append(Problem("tls.ca_path", str(ca), "mTLS needs tls.cert_path and key_path"))
    for name, path in (("tls.cert_path", cert), ("tls.key_path", key), ("tls.ca_path", ca)):
        if isinstance(path, Path) and not path.is_file():
            problems.append(Problem(name, str(path), "an existing PEM file (not found)"))
    return problems


def backend_installed(values: TypedValues, installed: Callable[[], Sequence[str]]) -> list[Problem]:
    name = values["backend"]
    available = list(installed())
    # No entry points at all means the package metadata is missing (a source tree that
    # was never installed): nothing to check against, so do not invent an error.
    if available and name not in available:
        return [Problem("backend", name, f"one of the installed backends: {', '.join(available)}")]
    return []


def environment_name(env: str, known: Sequence[str]) -> list[Problem]:
    if env not in known:
        return [Problem("ENV", env, f"one of {', '.join(known)}")]
    return []


def cross_key_problems(
    values: TypedValues, installed_backends: Callable[[], Sequence[str]]
) -> list[Problem]:
    """Every cross-key check whose keys all passed their own checks (`values` holds
    only those), so one bad port does not hide a TLS problem."""
    runs: list[tuple[tuple[str, ...], Callable[[], list[Problem]]]] = [
        (
            ("generation.max_new_tokens", "generation.max_new_tokens_limit"),
            lambda: generation_limits(values),
        ),
        (
            ("server.http_port", "server.grpc_port", "server.metrics_port"),
            lambda: distinct_ports(values),
        ),
        (("tls.cert_path", "tls.key_path", "tls.ca_path"), lambda: tls_files(values)),
        (("backend",), lambda: backend_installed(values, installed_backends)),
    ]
    problems: list[Problem] = []
    for keys, check in runs:
        if all(key in values for key in keys):
            problems += check()
    return problems
