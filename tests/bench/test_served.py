"""The benchmark runs what a user runs: default settings on every server variant, and the
ct2 server's own choice of kernels in the in-process ceiling."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from bench.config import BenchConfig
from bench.scenarios.grpc_server import server_environment, server_settings
from bench.served import DEFAULT_SETTINGS, Kernels, served


def test_every_server_variant_runs_auto_compute_type_and_threads_checked_at_load(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("LLM_LOCAL_SERVICE_RUNTIME__COMPUTE_TYPE", raising=False)
    environment = server_environment(BenchConfig(), grpc_port=1234)

    settings = server_settings(environment)

    assert settings["compute_type"] == "auto"
    assert (settings["inter_threads"], settings["intra_threads"]) == ("auto", "auto")
    for name, value in DEFAULT_SETTINGS.items():
        assert environment[name] == value


def test_a_compute_type_set_in_the_environment_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLM_LOCAL_SERVICE_RUNTIME__COMPUTE_TYPE", "float16")

    environment = server_environment(BenchConfig(), grpc_port=1234)

    assert environment["LLM_LOCAL_SERVICE_RUNTIME__COMPUTE_TYPE"] == "float16"


def test_what_a_server_says_it_serves_goes_into_the_report() -> None:
    health = {
        "backend": "llama_cpp",
        "numerics": {"verified": True, "nll_ratio": 1.004, "compute_type": "q4_1"},
    }
    config = {"effective": {"loaded_model": {"compute_type": "q4_1", "threads": [1, 1]}}}

    what = served(health, config)

    assert what["backend"] == "llama_cpp"
    assert what["compute_type"] == "q4_1"
    assert what["numerics_verified"] is True
    assert served({}, {})["numerics_verified"] is False  # nothing said: not verified


@pytest.mark.model
def test_the_in_process_ceiling_takes_the_server_s_cached_choice(
    link_test_model: Callable[[Path], Path], tmp_path: Path
) -> None:
    from bench.served import server_kernels
    from llm_local.backends.ct2 import autotune

    entry = link_test_model(tmp_path)
    key = autotune.verdict_key(autotune.machine_identity("cpu", 0))
    reference_nll = json.loads((entry / "reference.json").read_text())["nll"]
    verdict = {
        "layout_version": autotune.VERDICT_LAYOUT,
        "key": key,
        "identity": autotune.machine_identity("cpu", 0),
        "measurements": [
            # The fastest fails the check: the choice is the faithful one, as the server's.
            _measurement("int16", 500.0, nll=4 * reference_nll),
            _measurement("int8", 300.0, nll=reference_nll, env={"CT2_USE_MKL": "0"}),
            _measurement("float32", 100.0, nll=reference_nll),
        ],
        "cpus": 2,
        "single_speed_by_threads": {"1": 50.0, "2": 55.0},
        "seconds": 1.0,
        "created": "2026-01-01T00:00:00+00:00",
    }
    autotune.write_verdict(entry, autotune.Verdict.from_json(verdict))

    kernels = server_kernels(entry)

    assert kernels == Kernels(
        "int8", {"CT2_USE_MKL": "0"}, *autotune.Verdict.from_json(verdict).layout(), True,
        "the cached verdict",
    )  # fmt: skip


def _measurement(
    compute_type: str, speed: float, *, nll: float, env: dict[str, str] | None = None
) -> dict[str, object]:
    return {
        "compute_type": compute_type,
        "effective_type": compute_type,
        "nll": nll,
        "agreement": 0.74,
        "equal_answers": 7,
        "batch_tokens_per_s": speed,
        "single_tokens_per_s": speed / 4,
        "load_seconds": 0.1,
        "env": env or {},
    }
