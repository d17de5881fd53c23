"""Bad settings are rejected with the key named, and every problem is reported at once."""

from __future__ import annotations

from pathlib import Path

import pytest

from llm_local.settings.errors import SettingsError
from llm_local.settings.loader import load_settings

BAD_VALUES: list[tuple[str, object]] = [
    ("backend", ""),
    ("backend", "no-such-backend"),
    ("model.name", ""),
    ("model.name", "package:no-path-inside"),
    ("model.quantization", "int3"),
    ("model.cache_dir", ""),
    ("model.offline", "maybe"),
    ("model.context_limit", -1),
    ("model.load_retries", 1.5),
    ("model.load_retry_backoff_s", -2),
    ("model.convert_on_start", "sometimes"),
    ("runtime.device", "gpu"),
    ("runtime.device_index", -1),
    ("runtime.compute_type", "float8"),
    ("runtime.inter_threads", 0),
    ("transformers.threads", 0),
    ("runtime.intra_threads", -1),
    ("runtime.max_batch_size", 0),
    ("runtime.batch_wait_ms", "soon"),
    ("runtime.busy_batch_wait_ms", -1),
    ("transformers.dtype", "float8"),
    ("transformers.attn_implementation", "magic"),
    ("transformers.max_requests_per_batch", 0),
    ("transformers.max_batch_tokens", -1),
    ("transformers.kv_cache_tokens", "lots"),
    ("llama_cpp.kv_cache_tokens", -1),
    ("llama_cpp.sequences", 0),
    ("llama_cpp.prefill_chunk_tokens", 0),
    ("llama_cpp.gpu_layers", -1),
    ("llama_cpp.threads", 0),
    ("llama_cpp.repack", "maybe"),
    ("llama_cpp.prefix_cache_mb", -1),
    ("llama_cpp.prefix_isolation", "everyone"),
    ("llama_cpp.kv_layout", "unified"),
    ("generation.max_new_tokens", 0),
    ("generation.max_new_tokens", 4096),  # above max_new_tokens_limit (2048)
    ("generation.max_new_tokens_limit", "lots"),
    ("generation.temperature", -0.1),
    ("generation.top_k", -5),
    ("generation.top_p", 0),
    ("generation.top_p", 1.5),
    ("generation.repetition_penalty", 0),
    ("generation.max_stop_sequences", -1),
    ("generation.max_stop_sequence_length", 0),
    ("capacity.max_concurrent", 0),
    ("capacity.max_queued", -1),
    ("capacity.queue_timeout_s", 0),
    ("server.host", ""),
    ("server.http_port", 70000),
    ("server.grpc_port", -1),
    ("server.grpc_port", 16060),  # the HTTP port's
    ("server.metrics_port", "16062x"),
    ("server.require_tenant_id", "perhaps"),
    ("server.grace_period_s", -1),
    ("server.slow_start_s", -1),
    ("server.grpc_max_connection_age_s", -1),
    ("server.grpc_max_connection_age_s", "5m"),
    ("server.grpc_max_connection_age_grace_s", -0.5),
    ("tls.cert_path", "/no/such/cert.pem"),
    ("logging.level", "chatty"),
    ("openai.api_keys", 42),
    ("openai.api_keys", ["ok", 1]),
    ("openai.max_body_bytes", 10),
    ("openai.max_messages", 0),
    ("logging.format", "xml"),
    ("logging.log_prompts", "sometimes"),
    ("limits.grpc_max_message_bytes", 100),  # below the 1 KiB floor
    ("limits.grpc_max_message_bytes", 2**32),  # beyond a 32-bit length prefix
    ("limits.grpc_max_metadata_bytes", "16k"),
    ("limits.grpc_max_concurrent_streams", 0),
    ("limits.http_max_concurrent_streams", -1),
    ("limits.http_max_header_bytes", 2**31),
]


@pytest.mark.parametrize(("key", "value"), BAD_VALUES, ids=[f"{k}={v!r}" for k, v in BAD_VALUES])
def test_bad_value_is_rejected_naming_its_key(key: str, value: object) -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings(overrides={key: value})
    error = caught.value
    assert key in error.keys
    assert f"{key} = {value!r}" in str(error)


def test_bad_environment_variable_names_the_key_and_the_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LLM_LOCAL_SERVICE_HTTP_PORT", "99999")
    monkeypatch.setenv("LLM_LOCAL_SERVICE_CAPACITY__MAX_QUEUED", "-3")
    with pytest.raises(SettingsError) as caught:
        load_settings()
    message = str(caught.value)
    assert "server.http_port = 99999 (from LLM_LOCAL_SERVICE_HTTP_PORT)" in message
    assert "capacity.max_queued = -3 (from LLM_LOCAL_SERVICE_CAPACITY__MAX_QUEUED)" in message


def test_every_problem_is_reported_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLM_LOCAL_SERVICE_DEVICE", "tpu")
    monkeypatch.setenv("LOG_LEVEL", "loud")
    overrides = {
        "server.http_port": 99999,
        "generation.top_p": 2.0,
        "capacity.max_concurrent": 0,
        "tls.cert_path": "/no/cert.pem",  # and no key: two TLS problems
        "capacity.max_concurent": 4,  # a typo
    }
    with pytest.raises(SettingsError) as caught:
        load_settings(overrides=overrides)
    assert sorted(caught.value.keys) == sorted(
        [
            "runtime.device",
            "logging.level",
            "server.http_port",
            "generation.top_p",
            "capacity.max_concurrent",
            "tls.key_path",
            "tls.cert_path",
            "capacity.max_concurent",
        ]
    )
    lines = str(caught.value).splitlines()
    assert lines[0] == "invalid settings (8 problems):"
    assert len(lines) == 9


def test_unknown_key_in_a_table_is_a_typo_to_report(tmp_path: Path) -> None:
    typo = tmp_path / "typo.toml"
    typo.write_text("[default.server]\nhttp_prot = 1234\n", encoding="utf-8")
    with pytest.raises(SettingsError) as caught:
        load_settings(settings_files=[typo])
    assert caught.value.keys == ["server.http_prot"]
    assert "http_port" in str(caught.value)  # the message lists the keys that exist


def test_unknown_environment_is_rejected() -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings("prod")
    assert caught.value.keys == ["ENV"]
    assert "development, test, production" in str(caught.value)


def test_tls_key_without_certificate_is_rejected(tmp_path: Path) -> None:
    key = tmp_path / "key.pem"
    key.write_text("pem", encoding="utf-8")
    with pytest.raises(SettingsError) as caught:
        load_settings(overrides={"tls.key_path": str(key)})
    assert caught.value.keys == ["tls.cert_path"]


def test_client_ca_without_server_certificate_is_rejected(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("pem", encoding="utf-8")
    with pytest.raises(SettingsError) as caught:
        load_settings(overrides={"tls.ca_path": str(ca)})
    assert caught.value.keys == ["tls.ca_path"]


def test_ports_zero_are_allowed_and_may_repeat() -> None:
    server = load_settings(
        overrides={"server.http_port": 0, "server.grpc_port": 0, "server.metrics_port": 0}
    ).server
    assert (server.http_port, server.grpc_port, server.metrics_port) == (0, 0, 0)


def test_accepted_spellings_are_normalized() -> None:
    settings = load_settings(
        overrides={"logging.level": "warn", "runtime.device": "CPU", "model.offline": "yes"}
    )
    assert settings.logging.level == "WARNING"
    assert settings.runtime.device == "cpu"
    assert settings.model.offline is True


def test_api_keys_come_as_a_list_or_a_comma_separated_string(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert load_settings(overrides={"openai.api_keys": ["a", " b "]}).openai.api_keys == ("a", "b")
    monkeypatch.setenv("LLM_LOCAL_SERVICE_OPENAI__API_KEYS", "k1, k2,")
    assert load_settings().openai.api_keys == ("k1", "k2")
    monkeypatch.setenv("LLM_LOCAL_SERVICE_OPENAI__API_KEYS", "")
    assert load_settings().openai.api_keys == ()
