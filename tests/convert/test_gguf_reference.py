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
    served_gguf,
)
from llm_local.convert.reference import write_reference
from llm_local.convert.sources import ModelSource
from llm_local.core.numerics import Anchor, ProbeItem, Reference
from llm_local.settings.loader import load_settings
from llm_local.settings.schema import AppSettings
from tests.hub_cache import hub_cache


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


def test_a_hub_gguf_s_reference_is_keyed_by_its_downloaded_file(tmp_path: Path) -> None:
    """A hub repository holding one GGUF: its reference lives under the file's own entry
    (the path names the hub commit), found without a download once the file is in the
    hub cache, and not at all before."""
    gguf = tmp_path / "m.Q4_1.gguf"
    gguf.write_bytes(b"GGUF")
    settings = on_model("acme/m-gguf", tmp_path / "cache")
    empty_hub = dataclasses.replace(
        settings.model, download_dir=tmp_path / "empty-hub", offline=False
    )
    assert find_gguf_reference(dataclasses.replace(settings, model=empty_hub)) is None

    hub = hub_cache(tmp_path / "hub", "acme/m-gguf", {"m.Q4_1.gguf": gguf})
    settings = dataclasses.replace(
        settings, model=dataclasses.replace(settings.model, download_dir=hub)
    )
    source = served_gguf(settings, download=False)
    assert source is not None and source.kind == "gguf"
    assert source.path is not None and source.path.name == "m.Q4_1.gguf"
    assert find_gguf_reference(settings) is None  # nothing recorded yet
    reference = Reference(2, 4, (ProbeItem((1,), (2,)),), 0.7, Anchor(nll=0.7, agreement=1.0))
    entry = reference_dir(settings.model.cache_dir, source)
    entry.mkdir(parents=True)
    write_reference(entry, reference)

    assert find_gguf_reference(settings) == reference
