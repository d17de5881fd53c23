"""[adapters] sources prepared into the model cache: identified cheaply, converted once,
found again without converting, converted anew when the adapter's files change."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from llm_local.convert.adapters import (
    ensure_gguf_adapter,
    find_gguf_adapter,
    peft_adapter_dir,
    resolve_adapter,
)
from llm_local.convert.errors import ConversionError
from llm_local.convert.sources import ModelSource
from llm_local.settings.loader import load_settings
from llm_local.settings.schema import AdapterSettings, ModelSettings
from tests.convert.test_gguf_lora import base_gguf, peft_adapter


def model_settings(cache_dir: Path) -> ModelSettings:
    import dataclasses

    return dataclasses.replace(load_settings(env="test").model, cache_dir=cache_dir)


def base_source(path: Path) -> ModelSource:
    return ModelSource(
        spec=str(path),
        kind="gguf",
        identity=str(path),
        slug="base",
        path=path,
        revision=None,
        fingerprint="size=1",
    )


def test_sources_are_told_apart_without_reading_them(tmp_path: Path) -> None:
    peft_adapter(tmp_path / "peft")
    (tmp_path / "lora.gguf").write_bytes(b"GGUF")

    assert resolve_adapter(AdapterSettings("a", str(tmp_path / "peft"))).kind == "peft_dir"
    assert resolve_adapter(AdapterSettings("b", str(tmp_path / "lora.gguf"))).kind == "gguf"
    assert resolve_adapter(AdapterSettings("c", "acme/support-lora")).kind == "hub"


@pytest.mark.parametrize(
    ("source", "named"),
    [("missing-dir/", "not found"), ("/no/such/adapter", "not found"), (".", "no adapter_config")],
)
def test_a_bad_local_source_is_named_with_its_adapter(
    tmp_path: Path, source: str, named: str
) -> None:
    spec = str(tmp_path) if source == "." else source
    with pytest.raises(ConversionError, match=f"adapter 'x'.*{named}"):
        resolve_adapter(AdapterSettings("x", spec))


def test_converted_once_then_found_and_converted_anew_when_the_adapter_changes(
    tmp_path: Path,
) -> None:
    peft_adapter(tmp_path / "peft")
    base = base_gguf(tmp_path / "base.gguf")
    model = model_settings(tmp_path / "cache")
    adapter = AdapterSettings("support", str(tmp_path / "peft"))
    source = resolve_adapter(adapter)
    assert find_gguf_adapter(source, base_source(base), model.cache_dir) is None

    first = ensure_gguf_adapter(source, base_source(base), base, model)
    written = first.stat().st_mtime_ns
    again = ensure_gguf_adapter(resolve_adapter(adapter), base_source(base), base, model)

    assert again == first and first.stat().st_mtime_ns == written  # not converted twice
    assert find_gguf_adapter(resolve_adapter(adapter), base_source(base), model.cache_dir) == first
    assert not list((tmp_path / "cache").glob(".tmp-*"))  # the scratch directory is gone
    weights = tmp_path / "peft" / "adapter_model.safetensors"
    os.utime(weights, ns=(written + 10**9, written + 10**9))
    changed = ensure_gguf_adapter(resolve_adapter(adapter), base_source(base), base, model)
    assert changed != first and changed.is_file()


def test_a_gguf_lora_is_used_where_it_lies(tmp_path: Path) -> None:
    (tmp_path / "lora.gguf").write_bytes(b"GGUF")
    source = resolve_adapter(AdapterSettings("g", str(tmp_path / "lora.gguf")))

    found = find_gguf_adapter(source, base_source(tmp_path / "base.gguf"), tmp_path / "cache")

    assert found == tmp_path / "lora.gguf"


def test_the_transformers_backend_takes_a_peft_directory_as_is_and_refuses_a_gguf_lora(
    tmp_path: Path,
) -> None:
    peft_adapter(tmp_path / "peft")
    (tmp_path / "lora.gguf").write_bytes(b"GGUF")
    model = model_settings(tmp_path / "cache")

    peft = resolve_adapter(AdapterSettings("a", str(tmp_path / "peft")))
    gguf = resolve_adapter(AdapterSettings("g", str(tmp_path / "lora.gguf")))

    assert peft_adapter_dir(peft, model) == tmp_path / "peft"
    with pytest.raises(ConversionError) as refused:
        peft_adapter_dir(gguf, model)
    assert str(refused.value).startswith("adapter 'g': ")
    assert "only the llama_cpp backend applies" in str(refused.value)
    assert "PEFT adapter directory" in str(refused.value)
