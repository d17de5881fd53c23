"""Where the llama_cpp backend's numerics reference lives, and which sources get one."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from llm_local.convert.errors import ConversionError
from llm_local.convert.gguf_reference import (
    ensure_gguf_reference,
    find_gguf_reference,
    gguf_anchored,
    reference_dir,
)
from llm_local.convert.sources import ModelSource
from llm_local.core.numerics import Anchor, ProbeItem, Reference
from llm_local.settings.loader import load_settings
from llm_local.settings.schema import AppSettings


def gguf_source(fingerprint: str) -> ModelSource:
    path = Path("/models/m.gguf")
    return ModelSource(str(path), "gguf", str(path), "m.gguf", path, None, fingerprint)


def on_model(name: str, cache_dir: Path) -> AppSettings:
    settings = load_settings(env="test")
    model = dataclasses.replace(settings.model, name=name, cache_dir=cache_dir)
    return dataclasses.replace(settings, backend="llama_cpp", model=model)


def test_a_changed_gguf_gets_a_new_reference_entry(tmp_path: Path) -> None:
    first = reference_dir(tmp_path, gguf_source("size=1,mtime=1"))
    changed = reference_dir(tmp_path, gguf_source("size=1,mtime=2"))

    assert first != changed
    assert first.parent == changed.parent == tmp_path / "m.gguf"
    assert first.name.startswith("gguf-reference-")


def test_a_model_directory_has_no_gguf_reference_and_recording_one_says_why(
    tmp_path: Path,
) -> None:
    model_dir = tmp_path / "hf-model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    settings = on_model(str(model_dir), tmp_path / "cache")

    assert find_gguf_reference(settings) is None
    with pytest.raises(ConversionError, match=r"is not a \.gguf file"):
        ensure_gguf_reference(settings, lambda _: None)


def test_the_anchor_of_a_gguf_served_as_is_is_the_reference_itself() -> None:
    reference = Reference(2, 4, (ProbeItem((1,), (2,)),), 0.7, Anchor(nll=0.71, agreement=0.74))

    anchored = gguf_anchored(reference)

    assert anchored.anchor == Anchor(nll=0.7, agreement=1.0)
    assert (anchored.items, anchored.nll) == (reference.items, reference.nll)
