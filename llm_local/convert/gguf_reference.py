"""The numerics reference of a GGUF served as is (the llama_cpp backend).

The ct2 backend's reference lives beside its converted model (reference.py). A GGUF that
llama.cpp serves is not converted, so its reference gets a cache entry of its own:

    <cache_dir>/<source slug>/gguf-reference-<key>/reference.json

recorded by `llm-local convert` when `backend = "llama_cpp"` (`make run` runs it). What it
holds is what reference.py records: the greedy answers of the unquantized model to the
probe set (transformers' float32 dequantization of the GGUF: the GGUF is the only form of
the model there is) and their mean NLL per token. When the cache already holds a ct2
conversion of the same source with a reference, those answers are taken from it rather
than computed again (same source, same dequantization, same probe).

The anchor ("the probe in float32 on the stored weights") is the reference itself here:
the stored weights are the GGUF's, and the reference was computed from exactly them in
float32. So the judgement of llama.cpp's kernels is against float32 on the same weights,
as for ct2: NLL ratio over the reference's, greedy agreement over the reference's own
(1.0). What llama.cpp loses on top of the file's quantization (its activation
quantization, its repacked layouts, a broken kernel on some CPU) is what the check sees.

Sources: a `.gguf` file, a `package:` file, or a hub repository holding one GGUF: its
file, downloaded into the hub cache, is keyed like a local one (its path names the hub
commit, so another revision gets another reference). Looking a reference up never
downloads: a hub GGUF not in the hub cache yet has none.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

from llm_local.convert import cache
from llm_local.convert.errors import ConversionError
from llm_local.convert.reference import PROBE_VERSION, read_reference, write_reference
from llm_local.convert.sources import ModelSource, resolve_source
from llm_local.convert.unquantized import Report
from llm_local.core.numerics import Anchor, Reference
from llm_local.settings.schema import AppSettings

ENTRY_PREFIX = "gguf-reference"
# Bump when the entry's content changes shape.
LAYOUT_VERSION = 1


def reference_inputs(source: ModelSource) -> dict[str, str]:
    """What, when it changes, needs a new reference (no CTranslate2 version: none runs)."""
    return {**cache.source_inputs(source, LAYOUT_VERSION), "probe": str(PROBE_VERSION)}


def reference_dir(cache_dir: Path, source: ModelSource) -> Path:
    key = cache.inputs_key(reference_inputs(source))
    return cache_dir / source.slug / f"{ENTRY_PREFIX}-{key}"


def find_gguf_reference(settings: AppSettings) -> Reference | None:
    """The recorded reference of the configured GGUF, or None (never imports torch,
    never downloads)."""
    try:
        source = served_gguf(settings, download=False)
    except ConversionError:
        return None
    if source is None:
        return None
    return read_reference(reference_dir(settings.model.cache_dir, source))


def served_gguf(settings: AppSettings, *, download: bool) -> ModelSource | None:
    """The GGUF file the llama_cpp backend serves, as a source of its own: the `.gguf` or
    `package:` file itself, or a hub repository's one GGUF (downloaded when `download`,
    else found in the hub cache or not at all: None). None for a model directory."""
    source = resolve_source(settings.model)
    if source.kind == "gguf":
        return source
    if source.kind != "hub":
        return None
    from llm_local.backends.base import BackendLoadError
    from llm_local.backends.llama_cpp.loader import gguf_path

    model = settings.model if download else dataclasses.replace(settings.model, offline=True)
    try:
        path = gguf_path(source, model)
    except BackendLoadError as exc:
        if not download:
            return None
        raise ConversionError(str(exc)) from exc
    return resolve_source(dataclasses.replace(settings.model, name=str(path)))


def ensure_gguf_reference(settings: AppSettings, report: Report) -> tuple[Path, bool]:
    """(the entry, whether it was recorded now). Raises ConversionError."""
    source = served_gguf(settings, download=True)
    if source is None:
        raise ConversionError(
            f"model {settings.model.name!r} is not a .gguf file: the llama_cpp backend's "
            "numerics reference is recorded for a .gguf file, a package: file or a hub "
            "repository holding one GGUF"
        )
    cache_dir = settings.model.cache_dir
    target = reference_dir(cache_dir, source)
    if read_reference(target) is not None:
        return target, False
    try:
        with cache.conversion_lock(cache_dir):
            if read_reference(target) is not None:  # recorded while we waited for the lock
                return target, False
            reference = _reuse_ct2_reference(settings) or _record(source, settings, report)
            target.mkdir(parents=True, exist_ok=True)
            write_reference(target, reference)
    except OSError as exc:
        raise ConversionError(f"cannot write the reference into {cache_dir}: {exc}") from exc
    return target, True


def gguf_anchored(reference: Reference) -> Reference:
    """`reference` with its anchor replaced by itself: float32 on the GGUF's weights."""
    return Reference(
        probe_version=reference.probe_version,
        max_new_tokens=reference.max_new_tokens,
        items=reference.items,
        nll=reference.nll,
        anchor=Anchor(nll=reference.nll, agreement=1.0),
    )


def _reuse_ct2_reference(settings: AppSettings) -> Reference | None:
    """The unquantized answers recorded by a ct2 conversion of the same source, if any."""
    from llm_local.convert.api import find_converted

    model_dir = find_converted(settings)
    found = read_reference(model_dir) if model_dir is not None else None
    return gguf_anchored(found) if found is not None else None


def _record(source: ModelSource, settings: AppSettings, report: Report) -> Reference:
    from llm_local.convert.api import quiet_libraries
    from llm_local.convert.reference import PROBE_MAX_NEW_TOKENS, answer_probe
    from llm_local.convert.unquantized import load_unquantized

    report("recording the numerics reference (unquantized answers to the probe set)")
    work_dir = cache.new_work_dir(settings.model.cache_dir)
    try:
        with quiet_libraries(progress=False):
            model, hf_dir = load_unquantized(source, settings.model, work_dir, report)
            items, nll = answer_probe(model, hf_dir)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    anchor = Anchor(nll=nll, agreement=1.0)
    return Reference(PROBE_VERSION, PROBE_MAX_NEW_TOKENS, items, nll, anchor)
