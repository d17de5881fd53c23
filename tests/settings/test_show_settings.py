"""`llm-local settings`: prints the effective settings, or every problem with exit 2."""

from __future__ import annotations

import json

import pytest

from llm_local.cli import main


def test_prints_effective_settings_as_json(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLM_LOCAL_SERVICE_CAPACITY__MAX_CONCURRENT", "8")
    assert main(["settings", "--env", "test"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["env"] == "test"
    assert shown["capacity"]["max_concurrent"] == 8
    assert shown["resolved"]["device"] in {"cpu", "cuda"}


def test_unrelated_prefixed_variables_such_as_tokens_are_not_shown(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # dynaconf reads it as a top-level key; only the keys of the schema are shown.
    monkeypatch.setenv("LLM_LOCAL_SERVICE_HF_TOKEN", "hf_secret_value")
    assert main(["settings"]) == 0
    assert "hf_secret_value" not in capsys.readouterr().out


def test_bad_settings_print_every_problem_and_exit_2(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLM_LOCAL_SERVICE_HTTP_PORT", "99999")
    monkeypatch.setenv("LLM_LOCAL_SERVICE_RUNTIME__DEVICE", "gpu")
    assert main(["settings"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "server.http_port = 99999" in captured.err
    assert "runtime.device = 'gpu'" in captured.err
