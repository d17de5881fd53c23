"""The numerics check through a real `llm-local serve` on the real SmolLM2 model.

- `compute_type = auto` on a cache of its own: the first start measures every candidate
  on this machine and caches the verdict beside the model; the second start reuses it;
  both serve a verified type, and the README's first example answers correctly.
- An explicit type that fails the check keeps the service "failed" with the reason on
  /health (and does not retry); accepting unverified numerics serves it with a warning
  on /health, /config and /metrics.
- The llama_cpp backend: `llm-local convert` records the GGUF's reference, and the server
  checks the GGUF's kernels against it at load and says so on /health, /config, /metrics.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.e2e

CHECKED = {"LLM_LOCAL_SERVICE_NUMERICS__CHECK_AT_LOAD": "true"}
INT8 = {"LLM_LOCAL_SERVICE_RUNTIME__COMPUTE_TYPE": "int8"}  # checked in ~1/3 of float32's time
README_QUESTION = "What is the capital of France?"
MEASURE_TIMEOUT_S = 600.0


@pytest.fixture(scope="module")
def own_cache(
    link_test_model: Callable[[Path], Path], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """A model cache of this module's own: verdicts written there do not leak into the
    shared cache (a second `make test` would then find the first one's verdict)."""
    cache_dir = tmp_path_factory.mktemp("numerics-cache")
    link_test_model(cache_dir)
    return cache_dir


def readme_answer(server: Any) -> subprocess.CompletedProcess[str]:
    command = ["generate", README_QUESTION, "--port", str(server.grpc_port)]
    return subprocess.run(
        [sys.executable, "-m", "llm_local", *command],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def auto_settings(cache_dir: Path) -> dict[str, str]:
    return {
        **CHECKED,
        "LLM_LOCAL_SERVICE_MODEL__CACHE_DIR": str(cache_dir),
        "LLM_LOCAL_SERVICE_RUNTIME__COMPUTE_TYPE": "auto",
        "LLM_LOCAL_SERVICE_RUNTIME__INTER_THREADS": "auto",
        "LLM_LOCAL_SERVICE_RUNTIME__INTRA_THREADS": "auto",
    }


@dataclass(frozen=True)
class FirstStart:
    """What the first `auto` start on the module's own cache showed."""

    health: dict[str, Any]
    config: dict[str, Any]
    log: str
    readme_answer: subprocess.CompletedProcess[str]
    exit_status: int


@pytest.fixture(scope="module")
def first_auto_start(serve: Callable[..., Any], own_cache: Path) -> FirstStart:
    """The first start measures and caches the verdict, whichever test asks first: the
    tests that need a cached verdict depend on this, not on running after another test."""
    first = serve(env=auto_settings(own_cache), wait="listening")
    first.wait("ready", timeout=MEASURE_TIMEOUT_S)
    code, health = first.http_json("/health")
    assert code == 200
    # The README's first example, with the default greedy decoding.
    answer = readme_answer(first)
    _, config = first.http_json("/config")
    log = first.log_text()
    return FirstStart(health, config, log, answer, first.stop())


def test_auto_measures_once_serves_a_verified_type_and_reuses_the_verdict(
    serve: Callable[..., Any], own_cache: Path, first_auto_start: FirstStart
) -> None:
    numerics = first_auto_start.health["numerics"]
    assert numerics["verified"] is True
    assert numerics["chosen_by"] == "auto"
    assert numerics["nll_ratio"] <= 1.25
    assert numerics["agreement_ratio"] >= 0.6
    assert "measuring compute types on this machine" in first_auto_start.log
    assert list(own_cache.rglob("verdicts/*.json")), "the verdict was not cached"
    # A faithful type answers the README's first example as the unquantized model does.
    answer = first_auto_start.readme_answer
    assert answer.returncode == 0, answer.stderr
    assert "Paris" in answer.stdout
    threads = first_auto_start.config["effective"]["loaded_model"]["threads"]
    assert threads["inter_threads"] >= 1 and threads["intra_threads"] >= 1
    assert first_auto_start.exit_status == 0

    second = serve(env=auto_settings(own_cache))
    log = second.log_text()
    assert "numerics verdict for this machine found" in log
    assert "measuring compute types" not in log
    assert second.http_json("/health")[1]["numerics"] == numerics | {
        "nll_ratio": pytest.approx(numerics["nll_ratio"], rel=1e-3),
        "agreement_ratio": pytest.approx(numerics["agreement_ratio"], rel=1e-3),
    }


def wait_for(condition: Callable[[], bool], limit_s: float = 120.0) -> None:
    deadline = time.monotonic() + limit_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.2)


def test_an_explicit_type_failing_the_check_keeps_the_service_failed_with_the_reason(
    serve: Callable[..., Any],
) -> None:
    # int8 scores the unquantized answers a little worse than the unquantized model on
    # any CPU: a bound of exactly 1 fails it on purpose.
    server = serve(
        env={**CHECKED, **INT8, "LLM_LOCAL_SERVICE_NUMERICS__MAX_NLL_RATIO": "1.0"},
        wait="listening",
    )
    wait_for(lambda: server.http_json("/health")[1]["status"] == "failed")
    code, body = server.http_json("/health")
    assert code == 503
    assert body["model_ready"] is False
    assert "compute_type int8 is not faithful on this machine" in body["reason"]
    assert "numerics.max_nll_ratio" in body["reason"]
    assert "retrying" not in body["reason"]  # loading again cannot help
    assert server.http_json("/health/live")[0] == 503


def test_accepting_unverified_numerics_serves_with_a_warning_everywhere(
    serve: Callable[..., Any],
) -> None:
    server = serve(
        env={
            **CHECKED,
            **INT8,
            "LLM_LOCAL_SERVICE_NUMERICS__MAX_NLL_RATIO": "1.0",
            "LLM_LOCAL_SERVICE_NUMERICS__ACCEPT_UNVERIFIED": "true",
        }
    )
    _, health = server.http_json("/health")
    assert health["numerics"]["verified"] is False
    assert "numerics.max_nll_ratio" in health["numerics"]["warning"]
    _, config = server.http_json("/config")
    assert config["effective"]["loaded_model"]["numerics"] == health["numerics"]
    assert config["effective"]["numerics"]["accept_unverified"] is True
    labels = {"compute_type": "int8_float32", "chosen_by": "settings"}
    assert server.metric("llm_local_numerics_verified", labels) == 0.0
    ratio = server.metric("llm_local_numerics_nll_ratio")
    assert ratio is not None and ratio > 1.0
    assert "serving unverified numerics (numerics.accept_unverified)" in server.log_text()


def test_doctor_prints_the_verdict_table_from_the_cached_verdict(
    own_cache: Path, first_auto_start: FirstStart
) -> None:
    # The first auto start cached its verdict in own_cache.
    result = subprocess.run(
        [sys.executable, "-m", "llm_local", "doctor", "--json"],
        env={**os.environ, "ENV": "test", "LLM_LOCAL_SERVICE_MODEL__CACHE_DIR": str(own_cache)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    table = json.loads(result.stdout)
    assert table["verdict_cached"] is True
    candidates = {row["candidate"]: row for row in table["candidates"]}
    assert "float32" in candidates and candidates["float32"]["faithful"]
    assert table["auto_chooses"] in candidates
    assert candidates[table["auto_chooses"]]["faithful"]
    assert 0 < table["speed_vs_fastest"] <= 1


@pytest.fixture(scope="module")
def llama_cpp_cache(
    link_test_model: Callable[[Path], Path], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """A cache of its own holding the test model's ct2 entry: `llm-local convert` on
    llama_cpp takes the GGUF's reference from it (convert/gguf_reference.py)."""
    cache_dir = tmp_path_factory.mktemp("llama-cpp-numerics-cache")
    link_test_model(cache_dir)
    return cache_dir


def test_llama_cpp_checks_the_gguf_at_load_and_reports_it_everywhere(
    serve: Callable[..., Any], llama_cpp_cache: Path
) -> None:
    """No `llm-local convert` first: the server records the GGUF's reference at start
    (model.convert_on_start, as ct2 converts), then checks what it serves against it; with
    the default threads and weights ("auto", which the rest of the suite pins to 1 and the
    file as stored), measured at load: whichever weights win, they are the ones checked."""
    llama_cpp = {
        "LLM_LOCAL_SERVICE_BACKEND": "llama_cpp",
        "LLM_LOCAL_SERVICE_MODEL__CACHE_DIR": str(llama_cpp_cache),
        "LLM_LOCAL_SERVICE_MODEL__CONVERT_ON_START": "true",
        "LLM_LOCAL_SERVICE_LLAMA_CPP__THREADS": "auto",
        "LLM_LOCAL_SERVICE_LLAMA_CPP__WEIGHTS": "auto",
    }
    assert not list(llama_cpp_cache.rglob("gguf-reference-*/reference.json"))

    server = serve(env={**CHECKED, **llama_cpp})

    assert "has no numerics reference yet: recording it" in server.log_text()
    assert list(llama_cpp_cache.rglob("gguf-reference-*/reference.json"))
    again = subprocess.run(
        [sys.executable, "-m", "llm_local", "convert", "--quiet"],
        env={**os.environ, "ENV": "test", **llama_cpp},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert again.returncode == 0, again.stderr
    assert "is already at" in again.stdout

    _, health = server.http_json("/health")
    numerics = health["numerics"]
    assert health["backend"] == "llama_cpp"
    assert numerics["verified"] is True, numerics
    # What `auto` chose: the file or its Q8_0 copy, prepared by the start's convert step.
    served = numerics["compute_type"]
    expected = "Q4_1.gguf" if served == "q4_1" else f"/gguf-{served}-"  # the file, or its copy
    chosen = re.search(
        r"weights served by the llama_cpp backend \(auto\): (\S+)", server.log_text()
    )
    assert chosen is not None, server.log_text()
    if served == "q4_1" and "/gguf-q8_0-" in chosen.group(1):  # the copy was not faithful here
        assert "the re-laid copy failed the numerics check" in server.log_text()
    else:
        assert expected in chosen.group(1), chosen.group(1)
    assert (numerics["compute_type"], numerics["chosen_by"]) == (served, "settings")
    assert numerics["nll_ratio"] <= 1.25
    assert numerics["agreement_ratio"] >= 0.6
    _, config = server.http_json("/config")
    assert config["effective"]["loaded_model"]["numerics"] == numerics
    labels = {"compute_type": served, "chosen_by": "settings"}
    assert server.metric("llm_local_numerics_verified", labels) == 1.0
    assert server.metric("llm_local_numerics_nll_ratio") == pytest.approx(
        numerics["nll_ratio"], rel=1e-3
    )
    assert f"numerics check of {served}" in server.log_text()
    # `llm-local convert` (an init container) finds the same verdict and copy.
    assert f"weights served by the llama_cpp backend (auto): {chosen.group(1)}" in again.stdout
    assert re.search(
        r"llama\.cpp threads: \d+ \(steps of \d+ tokens, tokens/s by threads: 1: ",
        server.log_text(),
    )
