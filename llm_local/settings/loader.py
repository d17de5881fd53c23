"""Load the layered dynaconf settings, validate them all at once, and build AppSettings.

Layers, later wins: the packaged settings.toml, ./settings.toml, the files named in
LLM_LOCAL_SETTINGS_FILES, the `settings_files` argument, the .secrets.toml beside any
of them, environment variables (LLM_LOCAL_SERVICE_<TABLE>__<KEY>, then the original
service's names, see legacy.py), and finally `overrides`.
"""

from __future__ import annotations

import os
import re
import sys
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import fields as dataclass_fields
from dataclasses import replace
from pathlib import Path
from typing import Any

from llm_local.settings import checks
from llm_local.settings.errors import MISSING, Problem, SettingsError
from llm_local.settings.fields import FIELDS, TABLES, Field
from llm_local.settings.legacy import ENVVAR_PREFIX, legacy_values, nested_env_var
from llm_local.settings.schema import (
    AdapterSettings,
    AppSettings,
    CapacitySettings,
    GenerationDefaults,
    LimitsSettings,
    LlamaCppSettings,
    LoggingSettings,
    ModelSettings,
    NumericsSettings,
    OpenAISettings,
    RuntimeSettings,
    ServerSettings,
    TLSSettings,
    TransformersSettings,
)

PACKAGED_SETTINGS = Path(__file__).with_name("settings.toml")
LOCAL_SETTINGS_NAME = "settings.toml"
SECRETS_NAME = ".secrets.toml"
SETTINGS_FILES_ENV_VAR = "LLM_LOCAL_SETTINGS_FILES"
ENV_SWITCHER = "ENV"
DEFAULT_ENV = "development"
BUILTIN_ENVS = ("development", "test", "production")
# dynaconf's own tables, never an environment someone can choose.
_NON_ENV_TABLES = frozenset({"default", "global", "dynaconf"})

_TABLE_TYPES: dict[str, type[Any]] = {
    "model": ModelSettings,
    "runtime": RuntimeSettings,
    "transformers": TransformersSettings,
    "llama_cpp": LlamaCppSettings,
    "numerics": NumericsSettings,
    "generation": GenerationDefaults,
    "capacity": CapacitySettings,
    "server": ServerSettings,
    "tls": TLSSettings,
    "openai": OpenAISettings,
    "limits": LimitsSettings,
    "logging": LoggingSettings,
}


def load_settings(
    env: str | None = None,
    *,
    settings_files: Sequence[Path] = (),
    overrides: Mapping[str, object] | None = None,
) -> AppSettings:
    """Effective settings for `env` (default: $ENV, else development).

    `overrides` maps dotted keys ("runtime.compute_type") to values and wins over
    every other layer. Raises SettingsError listing every problem found.
    """
    environ = os.environ
    env_name = (env or environ.get(ENV_SWITCHER) or DEFAULT_ENV).strip().lower()
    files, problems = settings_file_list(settings_files, environ, Path.cwd())
    known_envs = environments_in(files)
    problems += checks.environment_name(env_name, known_envs)

    legacy = legacy_values(environ)
    try:
        settings = _dynaconf_settings(files, env_name)
        _apply_layers(settings, legacy, overrides or {})
        tree = _lowercase_tree(settings.as_dict())
        per_key = _failed_validators(settings)
    except Exception as exc:  # dynaconf reports a broken file only when it loads it
        raise SettingsError(
            [*problems, Problem("settings files", _names(files), str(exc))]
        ) from exc

    problems += checks.unknown_keys(tree)
    typed: dict[str, object] = {}
    for field in FIELDS:
        value = _lookup(tree, field.key)
        if field.key in per_key:
            source = _env_source(field.key, legacy, environ, overrides or {})
            problems.append(Problem(field.key, value, field.allowed, source))
        else:
            typed[field.key] = field.to_typed(value)
    problems += checks.cross_key_problems(typed, _installed_backends)
    adapters, adapter_problems = checks.adapter_table(tree.get(checks.ADAPTERS_TABLE))
    problems += adapter_problems
    if problems:
        raise SettingsError(problems)
    # A backend's own options live in a table named after it ([fake], [mybackend]):
    # the typed settings don't know them, so they reach the backend through `raw`.
    backend_options = tree.get(str(typed["backend"]))
    built = _build(env_name, typed, backend_options if isinstance(backend_options, dict) else None)
    if not adapters:
        return built
    return replace(
        built,
        adapters=tuple(AdapterSettings(i, s) for i, s in adapters.items()),
        raw={**built.raw, checks.ADAPTERS_TABLE: dict(adapters)},
    )


def settings_file_list(
    extra: Sequence[Path], environ: Mapping[str, str], cwd: Path
) -> tuple[list[Path], list[Problem]]:
    """The TOML files to load, in order, and problems with files that were named but absent."""
    problems: list[Problem] = []
    files = [PACKAGED_SETTINGS]
    local = cwd / LOCAL_SETTINGS_NAME
    if local.is_file() and local.resolve() != PACKAGED_SETTINGS.resolve():
        files.append(local)
    named = [
        Path(part.strip())
        for part in re.split(r"[,:]", environ.get(SETTINGS_FILES_ENV_VAR, ""))
        if part.strip()
    ]
    for path in [*named, *(Path(p) for p in extra)]:
        absolute = path.expanduser().absolute()
        if absolute.is_file():
            files.append(absolute)
        else:
            problems.append(
                Problem(SETTINGS_FILES_ENV_VAR, str(path), "existing settings files (not found)")
            )
    secret_dirs = dict.fromkeys([cwd, *(f.parent for f in files)])
    files += [d / SECRETS_NAME for d in secret_dirs if (d / SECRETS_NAME).is_file()]
    return list(dict.fromkeys(files)), problems


def environments_in(files: Iterable[Path]) -> list[str]:
    """The environments someone may choose: ours plus any table another file defines."""
    names = list(BUILTIN_ENVS)
    for path in files:
        if path == PACKAGED_SETTINGS:
            continue
        try:
            with path.open("rb") as handle:
                tables = tomllib.load(handle)
        except (OSError, tomllib.TOMLDecodeError):
            continue  # reported when dynaconf loads it
        names += [t.lower() for t, v in tables.items() if isinstance(v, dict)]
    return [n for n in dict.fromkeys(names) if n not in _NON_ENV_TABLES]


def _import_dynaconf_without_flask() -> Any:
    """dynaconf imports Flask (for its Flask extension) whenever Flask is installed,
    and Quart brings Flask along: 0.15-0.3 s of every command's start, for nothing.
    A None entry in sys.modules makes that optional import fail fast; it is removed
    again at once, so anything that needs Flask later still imports it normally."""
    if "dynaconf" in sys.modules or "flask" in sys.modules:
        import dynaconf

        return dynaconf
    sys.modules["flask"] = None  # type: ignore[assignment]
    try:
        import dynaconf
    finally:
        del sys.modules["flask"]
    return dynaconf


def _dynaconf_settings(files: Sequence[Path], env_name: str) -> Any:
    Dynaconf = _import_dynaconf_without_flask().Dynaconf

    settings = Dynaconf(
        settings_files=[str(path) for path in files],
        environments=True,
        env_switcher=ENV_SWITCHER,
        merge_enabled=True,  # else [production.model] silently replaces [default.model]
        envvar_prefix=ENVVAR_PREFIX,
        load_dotenv=False,
    )
    # The `env` argument must win over $ENV, which the switcher would read.
    settings.setenv(env_name)
    return settings


def _apply_layers(
    settings: Any,
    legacy: Mapping[str, tuple[str, str]],
    overrides: Mapping[str, object],
) -> None:
    for key, (raw_value, _variable) in legacy.items():
        # Parsed like dynaconf parses its own environment variables: "6000" is an int.
        settings.set(key, raw_value, tomlfy=True)
    for key, value in overrides.items():
        settings.set(key, value)


def _failed_validators(settings: Any) -> set[str]:
    """Keys whose value fails its per-key check, found by dynaconf's validate_all()."""
    from dynaconf import ValidationError, Validator

    settings.validators.register(*(_validator(field, Validator) for field in FIELDS))
    try:
        settings.validators.validate_all()
    except ValidationError as exc:
        return {validator.names[0] for validator, _message in exc.details}
    return set()


def _validator(field: Field, validator_type: Any) -> Any:
    def accepts(value: object) -> bool:
        return field.accepts(_plain(value))

    return validator_type(
        field.key,
        must_exist=True,
        condition=accepts,
        messages={
            "must_exist_true": f"{field.key} is missing: {field.allowed}",
            "condition": f"{field.key} = {{value!r}}: {field.allowed}",
        },
    )


def _plain(value: object) -> object:
    """dynaconf's Box and BoxList as the dict and list they are."""
    if isinstance(value, Mapping):
        return {str(k).lower(): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _lowercase_tree(data: Mapping[str, object]) -> dict[str, object]:
    plain = _plain(data)
    assert isinstance(plain, dict)
    return plain


def _lookup(tree: Mapping[str, object], dotted_key: str) -> object:
    node: object = tree
    for part in dotted_key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return MISSING
        node = node[part]
    return node


def _env_source(
    key: str,
    legacy: Mapping[str, tuple[str, str]],
    environ: Mapping[str, str],
    overrides: Mapping[str, object],
) -> str | None:
    """Which environment variable set `key`, so the message points at the right place."""
    if key in overrides:
        return None
    if nested_env_var(key) in environ:
        return nested_env_var(key)
    if key in legacy:
        return legacy[key][1]
    return None


def _names(files: Sequence[Path]) -> str:
    return ", ".join(str(path) for path in files)


def _installed_backends() -> list[str]:
    from llm_local.backends.base import available_backends

    return available_backends()


def _build(
    env_name: str, typed: Mapping[str, object], backend_options: dict[str, object] | None
) -> AppSettings:
    tables: dict[str, Any] = {}
    for table, table_type in _TABLE_TYPES.items():
        names = [f.name for f in dataclass_fields(table_type)]
        tables[table] = table_type(**{name: typed[f"{table}.{name}"] for name in names})
    raw = effective_dict(env_name, typed)
    # A table the typed settings know (e.g. [transformers]) is already in `raw`, typed.
    if backend_options is not None and str(typed["backend"]) not in TABLES:
        raw[str(typed["backend"])] = backend_options
    return AppSettings(env=env_name, backend=str(typed["backend"]), raw=raw, **tables)


def effective_dict(env_name: str, typed: Mapping[str, object]) -> dict[str, object]:
    """The settings as plain JSON-ready data: {"model": {"name": ...}, ...}."""
    result: dict[str, object] = {"env": env_name}
    for key, value in typed.items():
        plain = str(value) if isinstance(value, Path) else value
        table, _, name = key.rpartition(".")
        if not table:
            result[name] = plain
            continue
        section = result.setdefault(table, {})
        assert isinstance(section, dict)
        section[name] = plain
    return result


__all__ = ["TABLES", "Problem", "SettingsError", "effective_dict", "load_settings"]
