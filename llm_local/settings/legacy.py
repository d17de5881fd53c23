"""Environment variable names of the original service, kept working unchanged.

dynaconf reads LLM_LOCAL_SERVICE_MODEL_NAME as a top-level key MODEL_NAME; these
names are folded into their nested keys instead. When the new nested name
(LLM_LOCAL_SERVICE_MODEL__NAME) is set too, the new name wins.
"""

from __future__ import annotations

from collections.abc import Mapping

ENVVAR_PREFIX = "LLM_LOCAL_SERVICE"

LEGACY_ENV_VARS: dict[str, str] = {
    "LOG_LEVEL": "logging.level",
    "LLM_LOCAL_SERVICE_MODEL_NAME": "model.name",
    "LLM_LOCAL_SERVICE_DEVICE": "runtime.device",
    "LLM_LOCAL_SERVICE_COMPUTE_TYPE": "runtime.compute_type",
    "LLM_LOCAL_SERVICE_HTTP_PORT": "server.http_port",
    "LLM_LOCAL_SERVICE_GRPC_PORT": "server.grpc_port",
    "LLM_LOCAL_SERVICE_METRICS_PORT": "server.metrics_port",
    # The gateway's own names for the same files (CONTRACT.md, TLS).
    "LLM_LOCAL_SERVICE_GRPC_TLS_CERT_PATH": "tls.cert_path",
    "LLM_LOCAL_SERVICE_GRPC_TLS_KEY_PATH": "tls.key_path",
    "LLM_LOCAL_SERVICE_GRPC_TLS_CA_PATH": "tls.ca_path",
}

_HF_TRUE = frozenset({"1", "true", "yes", "on"})


def nested_env_var(dotted_key: str) -> str:
    return f"{ENVVAR_PREFIX}_{dotted_key.replace('.', '__').upper()}"


def legacy_values(environ: Mapping[str, str]) -> dict[str, tuple[str, str]]:
    """dotted key -> (raw string value, the variable it came from)."""
    found: dict[str, tuple[str, str]] = {}
    for variable, key in LEGACY_ENV_VARS.items():
        if variable in environ and nested_env_var(key) not in environ:
            found[key] = (environ[variable], variable)
    hf_offline = environ.get("HF_HUB_OFFLINE", "").strip().lower()
    if hf_offline in _HF_TRUE and nested_env_var("model.offline") not in environ:
        found["model.offline"] = ("true", "HF_HUB_OFFLINE")
    return found
