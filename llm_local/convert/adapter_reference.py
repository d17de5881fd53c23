"""The numerics reference of a LoRA adapter on the llama_cpp backend's base GGUF.

The model's reference (gguf_reference.py) is the unquantized model's greedy answers to the
probe set and their NLL per token. An adapter's is the same probe answered by the
unquantized base with the adapter applied (PEFT on transformers' float32 dequantization of
the GGUF, the adapter beside the weights as PEFT applies it), recorded where the adapter is
converted, by `llm-local convert`, into an entry beside the adapter's GGUF LoRA:

    <cache_dir>/adapters/<slug>/reference-<key>/reference.json

`key` hashes what the GGUF LoRA's does (the adapter's source and the base's) and the probe
version. At load, the llama_cpp backend runs the probe with each adapter applied and judges
it against this reference like the model's (backends/llama_cpp/canary.py). The base is
loaded once for all the adapters that lack a reference.

An adapter the load path converted (the cache lacked its GGUF LoRA) has no reference
until `llm-local convert` runs: it serves unverified, saying so, as a model does.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from llm_local.convert import cache
from llm_local.convert.adapters import (
    AdapterSource,
    gguf_plan,
    peft_adapter_dir,
    resolve_adapter,
)
from llm_local.convert.errors import ConversionError, first_line
from llm_local.convert.reference import PROBE_VERSION, read_reference, write_reference
from llm_local.convert.sources import ModelSource, resolve_source
from llm_local.core.numerics import Anchor, Reference
from llm_local.settings.schema import AppSettings

ENTRY_PREFIX = "reference"
Report = Callable[[str], None]


def reference_dir(source: AdapterSource, base: ModelSource, cache_dir: Path) -> Path:
    _, _, inputs = gguf_plan(source, base, cache_dir)
    key = cache.inputs_key({**inputs, "probe": str(PROBE_VERSION)})
    return cache_dir / "adapters" / source.slug / f"{ENTRY_PREFIX}-{key}"


def find_adapter_references(settings: AppSettings) -> dict[str, Reference]:
    """The recorded reference of each configured adapter that has one (never imports
    torch); adapters without one are absent."""
    try:
        base = resolve_source(settings.model)
    except ConversionError:
        return {}
    found: dict[str, Reference] = {}
    for adapter in settings.adapters:
        try:
            source = resolve_adapter(adapter)
        except ConversionError:
            continue
        reference = read_reference(reference_dir(source, base, settings.model.cache_dir))
        if reference is not None:
            found[adapter.id] = reference
    return found


def ensure_adapter_references(settings: AppSettings, report: Report) -> dict[str, Path]:
    """Each configured adapter's reference entry on the GGUF base, recorded now where the
    cache lacks it. Raises ConversionError naming the adapter."""
    if not settings.adapters:
        return {}
    base = resolve_source(settings.model)
    if base.kind != "gguf" or base.path is None:
        return {}  # the hub base's adapters: see the module's docstring of adapters.py
    cache_dir = settings.model.cache_dir
    entries = {
        adapter.id: (
            resolve_adapter(adapter),
            reference_dir(resolve_adapter(adapter), base, cache_dir),
        )
        for adapter in settings.adapters
    }
    missing = {
        adapter_id: (source, entry)
        for adapter_id, (source, entry) in entries.items()
        if read_reference(entry) is None
    }
    if missing:
        with cache.conversion_lock(cache_dir):
            missing = {k: v for k, v in missing.items() if read_reference(v[1]) is None}
            if missing:
                _record(settings, base, missing, report)
    return {adapter_id: entry for adapter_id, (_, entry) in entries.items()}


def _record(
    settings: AppSettings,
    base: ModelSource,
    missing: dict[str, tuple[AdapterSource, Path]],
    report: Report,
) -> None:
    from llm_local.convert.api import quiet_libraries
    from llm_local.convert.reference import PROBE_MAX_NEW_TOKENS, answer_probe
    from llm_local.convert.unquantized import load_unquantized

    report(
        f"recording the numerics reference of adapter(s) {', '.join(sorted(missing))} "
        "(the unquantized base + adapter's answers to the probe set)"
    )
    work_dir = cache.new_work_dir(settings.model.cache_dir)
    try:
        with quiet_libraries(progress=False):
            model, hf_dir = load_unquantized(base, settings.model, work_dir, report)
            wrapper = None
            for adapter_id, (source, entry) in sorted(missing.items()):
                path = str(peft_adapter_dir(source, settings.model))
                try:
                    if wrapper is None:
                        from peft import PeftModel

                        wrapper = PeftModel.from_pretrained(model, path, adapter_name=adapter_id)
                    else:
                        wrapper.load_adapter(path, adapter_name=adapter_id)
                    wrapper.set_adapter(adapter_id)
                    wrapper.eval()
                    items, nll = answer_probe(wrapper, hf_dir)
                except Exception as exc:
                    raise ConversionError(
                        f"adapter {adapter_id!r}: recording its numerics reference failed: "
                        f"{type(exc).__name__}: {first_line(exc)}"
                    ) from exc
                reference = Reference(
                    PROBE_VERSION, PROBE_MAX_NEW_TOKENS, items, nll, Anchor(nll=nll, agreement=1.0)
                )
                entry.mkdir(parents=True, exist_ok=True)
                write_reference(entry, reference)
    except OSError as exc:
        raise ConversionError(f"cannot write an adapter's reference into the cache: {exc}") from exc
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
