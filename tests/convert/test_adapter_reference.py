"""Where an adapter's numerics reference lies and when it is found (convert/adapter_reference.py).

Recording one (the unquantized base + adapter answering the probe) runs in
tests/e2e/test_lora_adapters.py through `llm-local convert`."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from llm_local.convert.adapter_reference import find_adapter_references, reference_dir
from llm_local.convert.adapters import resolve_adapter
from llm_local.convert.reference import write_reference
from llm_local.convert.sources import resolve_source
from llm_local.core.numerics import Anchor, ProbeItem, Reference
from llm_local.settings.loader import load_settings
from llm_local.settings.schema import AdapterSettings, AppSettings
from tests.convert.test_gguf_lora import peft_adapter

REFERENCE = Reference(2, 4, (ProbeItem((1, 2), (3,)),), 1.5, Anchor(nll=1.5, agreement=1.0))


def settings_with(tmp_path: Path, *adapters: AdapterSettings) -> AppSettings:
    settings = load_settings(env="test")
    model = dataclasses.replace(settings.model, cache_dir=tmp_path / "cache")
    return dataclasses.replace(settings, model=model, adapters=adapters)


def test_a_recorded_reference_is_found_by_its_adapter_and_only_while_the_adapter_is_unchanged(
    tmp_path: Path,
) -> None:
    peft_adapter(tmp_path / "pirate")
    peft_adapter(tmp_path / "robot")
    adapters = (
        AdapterSettings("pirate", str(tmp_path / "pirate")),
        AdapterSettings("robot", str(tmp_path / "robot")),
    )
    settings = settings_with(tmp_path, *adapters)
    base = resolve_source(settings.model)
    entry = reference_dir(resolve_adapter(adapters[0]), base, settings.model.cache_dir)

    assert find_adapter_references(settings) == {}
    entry.mkdir(parents=True)
    write_reference(entry, REFERENCE)
    assert find_adapter_references(settings) == {"pirate": REFERENCE}

    (tmp_path / "pirate" / "adapter_config.json").write_text("{}\n")  # the adapter changed
    assert find_adapter_references(settings) == {}
