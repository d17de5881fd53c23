"""The HTTP side of a real `llm-local serve` on the real model: health, config, metrics.

One server for most of the module: a slow start (so that "loading" is observable),
capacity for exactly one generation (so that "full" is easy to reach), and secrets in a
`.secrets.toml` and in the environment (which /config must not show). Two more servers
show a broken model path and the stop on SIGTERM.
"""

from __future__ import annotations

import json
import signal
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from llm_local.proto.sentiric.llm.v1 import llama_pb2

from .conftest import until

pytestmark = [pytest.mark.e2e, pytest.mark.model]

QUESTION = "What is the capital of France? Answer in one sentence."
# Greedy SmolLM2 counts on and on: it keeps the only generation slot busy.
ENDLESS = "Write the numbers from 1 to 1000, separated by commas."
SECRET_IN_FILE = "hf_secretsfile_7f3a9c1e5b"
SECRET_IN_FILE_TOO = "sk-secretsfile-api-key-22d0"
SECRET_IN_ENV = "env-password-9b8e41"
SERVICE = {"service": "LlamaService"}
WAIT_S = 60.0  # generous: the machine is shared


@dataclass
class StartupObservations:
    """What /health and /health/ready answered while the server was starting."""

    health: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    ready: list[tuple[int, dict[str, Any]]] = field(default_factory=list)


def settings_dir_with_secrets(directory: Path) -> Path:
    """A settings file (named by LLM_LOCAL_SETTINGS_FILES) with a .secrets.toml beside it."""
    (directory / "settings.toml").write_text("[test.logging]\nlevel = 'INFO'\n")
    (directory / ".secrets.toml").write_text(
        f"[default]\nhub_token = '{SECRET_IN_FILE}'\n\n"
        f"[test]\napi_key = '{SECRET_IN_FILE_TOO}'\n\n"
        # A visible setting from the same file proves the server really read it.
        "[test.generation]\nmax_stop_sequences = 5\n"
    )
    return directory / "settings.toml"


@pytest.fixture(scope="module")
def started(
    serve: Callable[..., Any], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Any, StartupObservations]:
    settings_file = settings_dir_with_secrets(tmp_path_factory.mktemp("settings"))
    server = serve(
        env={
            "LLM_LOCAL_SERVICE_SERVER__SLOW_START_S": "2",
            "LLM_LOCAL_SERVICE_CAPACITY__MAX_CONCURRENT": "1",
            "LLM_LOCAL_SERVICE_CAPACITY__MAX_QUEUED": "0",
            "LLM_LOCAL_SETTINGS_FILES": str(settings_file),
            "LLM_LOCAL_SERVICE_HUB_PASSWORD": SECRET_IN_ENV,
            "LLM_LOCAL_SERVICE_LOGGING__FORMAT": "json",
        },
        wait="listening",
    )
    seen = StartupObservations()

    def healthy() -> bool:
        seen.health.append(server.http_json("/health"))
        seen.ready.append(server.http_json("/health/ready"))
        return seen.health[-1][0] == 200

    until(healthy, "/health says 200 after the model loaded", timeout=120)
    return server, seen


@pytest.fixture(scope="module")
def server(started: tuple[Any, StartupObservations]) -> Any:
    return started[0]


def ask(
    server: Any,
    rpc: Any,
    prompt: str = QUESTION,
    max_new_tokens: int = 24,
    metadata: tuple[tuple[str, str], ...] = (),
) -> Any:
    message = llama_pb2.GenerateStreamRequest(user_prompt=prompt)
    message.params.CopyFrom(llama_pb2.GenerationParams(max_new_tokens=max_new_tokens))
    return rpc.llama(server.channel(), message, metadata=metadata)


class RunningGeneration:
    """A long generation in a thread; entered once its first token arrived."""

    def __init__(self, server: Any, rpc: Any) -> None:
        self.call = ask(server, rpc, ENDLESS, max_new_tokens=1500)
        self.first_token = threading.Event()
        self.error: grpc.RpcError | None = None
        self._thread = threading.Thread(target=self._consume, daemon=True)

    def _consume(self) -> None:
        try:
            for _ in self.call:
                self.first_token.set()
        except grpc.RpcError as error:
            self.error = error
        finally:
            self.first_token.set()

    def __enter__(self) -> RunningGeneration:
        self._thread.start()
        assert self.first_token.wait(WAIT_S), "no token within the time limit"
        assert self.error is None, self.error
        return self

    def __exit__(self, *exc: object) -> None:
        self.call.cancel()
        self._thread.join(WAIT_S)


def counter(server: Any, name: str, **labels: str) -> float:
    value = server.metric(name, labels)
    return 0.0 if value is None else value


# -- loading -> ready ------------------------------------------------------------------


def test_health_is_503_loading_then_200_once_the_model_loaded(
    started: tuple[Any, StartupObservations],
) -> None:
    server, seen = started
    first_code, first_body = seen.health[0]
    assert first_code == 503
    assert first_body["status"] == "loading"
    assert first_body["model_ready"] is False
    assert all(body["status"] == "loading" for code, body in seen.health if code == 503)

    last_code, last_body = seen.health[-1]
    assert last_code == 200
    assert last_body["status"] == "healthy"
    assert last_body["model_ready"] is True
    assert "SmolLM2-135M-Instruct" in last_body["model_name"]
    assert last_body["device"] == "cpu"
    assert last_body["compute_type"]

    # Readiness said 503 while loading, with the reason.
    assert seen.ready[0][0] == 503
    assert "loading" in seen.ready[0][1]["reason"]
    assert server.http_json("/health/ready") == (200, {"ready": True, "status": "ready"})
    assert server.http_json("/health/live")[0] == 200


def test_model_load_is_in_the_metrics(server: Any) -> None:
    assert server.metric("llm_local_model_state", {"state": "ready"}) == 1
    assert server.metric("llm_local_model_state", {"state": "loading"}) == 0
    assert server.metric("llm_local_model_ready") == 1
    load_seconds = server.metric("llm_local_model_load_seconds")
    assert load_seconds is not None and load_seconds > 0
    assert server.metric("llm_local_model_info", {"backend": "ct2", "device": "cpu"}) == 1


# -- capacity --------------------------------------------------------------------------


def test_readiness_is_503_while_the_only_slot_is_taken(server: Any, rpc: Any) -> None:
    rejected_before = counter(server, "llm_local_requests_rejected_total", **SERVICE)

    with RunningGeneration(server, rpc):
        code, body = server.http_json("/health/ready")
        assert code == 503
        assert body["status"] == "full"
        assert "1 running" in body["reason"]
        assert server.metric("llm_local_requests_running") == 1
        # The contract's /health reports the model, not the load.
        assert server.http_json("/health")[0] == 200

        error = rpc.error(lambda: list(ask(server, rpc)))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

    assert counter(server, "llm_local_requests_rejected_total", **SERVICE) == rejected_before + 1
    # The cancelled generation frees its slot: ready again.
    until(lambda: server.http_get("/health/ready")[0] == 200, "ready after the cancel")
    assert server.metric("llm_local_requests_running") == 0


# -- config ----------------------------------------------------------------------------


def test_config_shows_the_effective_settings_without_secrets(server: Any) -> None:
    code, raw_body = server.http_get("/config")
    assert code == 200
    text = raw_body.decode()
    for secret in (SECRET_IN_FILE, SECRET_IN_FILE_TOO, SECRET_IN_ENV):
        assert secret not in text

    body = json.loads(text)
    effective = body["effective"]
    assert effective["env"] == "test"
    assert effective["backend"] == "ct2"
    assert "SmolLM2-135M-Instruct" in effective["model"]["name"]
    assert effective["capacity"]["max_concurrent"] == 1
    assert effective["ports"]["http"] == server.http_port
    assert effective["ports"]["grpc"] == server.grpc_port
    assert effective["loaded_model"]["device"] == "cpu"
    # Read from the same .secrets.toml as the secrets: the file was loaded.
    assert effective["generation"]["max_stop_sequences"] == 5
    versions = body["versions"]
    assert versions["ctranslate2"]
    assert versions["transformers"]


# -- metrics ---------------------------------------------------------------------------


def test_metrics_count_a_real_generation(server: Any, rpc: Any) -> None:
    before = {
        name: counter(server, name, **SERVICE)
        for name in (
            "llm_local_prompt_tokens_total",
            "llm_local_completion_tokens_total",
            "llm_local_time_to_first_token_seconds_count",
            "llm_local_time_to_first_token_seconds_sum",
            "llm_local_request_duration_seconds_count",
        )
    }
    ok_before = counter(server, "llm_local_requests_total", code="OK", **SERVICE)
    gaps_before = counter(server, "llm_local_inter_token_latency_seconds_count")

    responses = list(ask(server, rpc))
    details = responses[-1].finish_details
    assert details.completion_tokens > 1

    def grew(name: str) -> float:
        return counter(server, name, **SERVICE) - before[name]

    assert grew("llm_local_prompt_tokens_total") == details.prompt_tokens
    assert grew("llm_local_completion_tokens_total") == details.completion_tokens
    assert grew("llm_local_time_to_first_token_seconds_count") == 1
    assert grew("llm_local_time_to_first_token_seconds_sum") > 0
    assert grew("llm_local_request_duration_seconds_count") == 1
    assert counter(server, "llm_local_requests_total", code="OK", **SERVICE) == ok_before + 1
    assert counter(server, "llm_local_inter_token_latency_seconds_count") > gaps_before
    # Counters and histograms that have seen a request, yet no `*_created` timestamps.
    _, body = server.http_get("/metrics")
    assert b"llm_local_requests_total{" in body
    assert b"_created" not in body


def test_metrics_port_serves_the_same_metrics(server: Any) -> None:
    url = f"http://{server.host}:{server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    assert 'llm_local_model_state{state="ready"} 1.0' in text


# -- logs ------------------------------------------------------------------------------


def test_logs_are_json_lines_with_the_request_ids(server: Any, rpc: Any) -> None:
    metadata = (("x-tenant-id", "tenant-e2e"), ("x-trace-id", "trace-e2e-41"), ("x-span-id", "s1"))
    details = list(ask(server, rpc, max_new_tokens=4, metadata=metadata))[-1].finish_details

    def request_lines() -> list[dict[str, Any]]:
        # Every line must parse: log shippers read JSON lines, nothing else.
        entries = [json.loads(line) for line in server.log_text().splitlines() if line]
        return [entry for entry in entries if entry.get("trace_id") == "trace-e2e-41"]

    until(lambda: bool(request_lines()), "a log line about the request")
    (finished,) = [e for e in request_lines() if e["message"] == "request finished"]
    assert finished["tenant_id"] == "tenant-e2e"
    assert finished["span_id"] == "s1"
    assert finished["request_id"]
    assert finished["status"] == "OK"
    assert finished["completion_tokens"] == details.completion_tokens
    assert finished["prompt_tokens"] == details.prompt_tokens
    assert finished["ttft_ms"] > 0
    assert finished["duration_ms"] >= finished["ttft_ms"]


# -- errors ----------------------------------------------------------------------------


def test_unknown_routes_and_methods_get_json_errors(server: Any) -> None:
    code, body = server.http_get("/nope")
    assert code == 404
    assert json.loads(body)["status"] == 404

    request = urllib.request.Request(server.url("/health"), method="DELETE")
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=5)
    assert caught.value.code == 405
    assert json.loads(caught.value.read())["status"] == 405


# -- a broken model --------------------------------------------------------------------


@pytest.fixture(scope="module")
def broken(serve: Callable[..., Any]) -> Any:
    return serve(
        env={
            "LLM_LOCAL_SERVICE_MODEL__NAME": "/nonexistent/llm-local-e2e/model",
            "LLM_LOCAL_SERVICE_MODEL__CONVERT_ON_START": "false",
            "LLM_LOCAL_SERVICE_MODEL__LOAD_RETRIES": "0",
        },
        wait="listening",
    )


def test_a_broken_model_path_is_503_failed_with_the_reason(broken: Any) -> None:
    until(
        lambda: broken.http_json("/health")[1]["status"] == "failed",
        "/health says failed",
    )
    code, body = broken.http_json("/health")
    assert code == 503
    assert body["model_ready"] is False
    assert "/nonexistent/llm-local-e2e/model" in body["reason"]

    # The process stays up and keeps answering.
    assert broken.process.poll() is None
    assert broken.http_json("/health/ready")[0] == 503
    assert broken.http_json("/health/live")[1]["status"] == "dead"
    assert broken.metric("llm_local_model_state", {"state": "failed"}) == 1
    assert broken.metric("llm_local_model_load_failures_total") == 1
    assert broken.http_json("/health")[0] == 503
    assert broken.process.poll() is None


# -- SIGTERM ---------------------------------------------------------------------------


def test_sigterm_turns_readiness_503_at_once_then_exits_0(
    serve: Callable[..., Any], rpc: Any
) -> None:
    server = serve(env={"LLM_LOCAL_SERVICE_SERVER__GRACE_PERIOD_S": "2"})

    with RunningGeneration(server, rpc) as generation:
        server.process.send_signal(signal.SIGTERM)
        # While the running stream gets its grace period, probes already see "stopping".
        until(lambda: server.http_get("/health/ready")[0] == 503, "readiness 503 after SIGTERM")
        code, body = server.http_json("/health/ready")
        assert (code, body["status"]) == (503, "stopping")
        assert server.http_json("/health")[1]["status"] == "stopping"
        assert generation.error is None  # the stream is still running

        assert server.process.wait(WAIT_S) == 0
