"""Convert the configured model into the cache once; find it there afterwards.

`find_converted` is what the server calls on every start: it identifies the source
with a stat() or a metadata lookup and reads one manifest, never importing torch or
transformers. `ensure_converted` does the work when the cache lacks the model, in a
scratch directory renamed into place only when complete (see cache.py).
"""

from __future__ import annotations

import contextlib
import errno
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from llm_local.convert import cache
from llm_local.convert.errors import ConversionError, first_line
from llm_local.convert.sources import ModelSource, resolve_source
from llm_local.convert.unquantized import Report, load_unquantized, materialize
from llm_local.settings.device import resolve_quantization, target_device
from llm_local.settings.schema import AppSettings


@dataclass(frozen=True, slots=True)
class ConversionResult:
    model_dir: Path
    converted: bool  # False: the cache already held it
    seconds: float
    manifest: dict[str, object]


@dataclass(frozen=True, slots=True)
class ConversionPlan:
    """Where the settings' model lives in the cache, worked out without converting."""

    source: ModelSource
    quantization: str
    inputs: dict[str, str]
    key: str
    cache_dir: Path
    model_dir: Path


def plan_conversion(settings: AppSettings) -> ConversionPlan:
    source = resolve_source(settings.model)
    device = target_device(settings.runtime)
    quantization = resolve_quantization(settings.model, settings.runtime, device)
    inputs = cache.conversion_inputs(source, quantization)
    key = cache.inputs_key(inputs)
    cache_dir = settings.model.cache_dir
    return ConversionPlan(
        source=source,
        quantization=quantization,
        inputs=inputs,
        key=key,
        cache_dir=cache_dir,
        model_dir=cache.model_dir_for(cache_dir, source, quantization, key),
    )


def find_converted(settings: AppSettings) -> Path | None:
    """The complete converted model for these settings, or None."""
    try:
        plan = plan_conversion(settings)
    except ConversionError:
        return None
    if cache.read_complete(plan.model_dir, plan.key) is None:
        return None
    return plan.model_dir


def ensure_converted(
    settings: AppSettings, *, force: bool = False, progress: bool = True
) -> ConversionResult:
    """Convert the configured model unless the cache holds it already.

    Raises ConversionError with a one-line reason; the cache then holds what it held
    before (or, for a forced reconversion killed at the wrong instant, nothing).
    """
    started = time.monotonic()
    plan = plan_conversion(settings)
    if not force:
        manifest = cache.read_complete(plan.model_dir, plan.key)
        if manifest is not None and has_reference(plan.model_dir):
            _clean_orphans_if_idle(plan.cache_dir)
            return ConversionResult(plan.model_dir, False, time.monotonic() - started, manifest)
    report = _stderr_report if progress else _silent
    try:
        with cache.conversion_lock(plan.cache_dir):
            # Another process may have converted it while this one waited for the lock.
            manifest = None if force else cache.read_complete(plan.model_dir, plan.key)
            if manifest is not None:
                if not has_reference(plan.model_dir):
                    manifest = _add_reference(plan, settings, report, progress)
                return ConversionResult(plan.model_dir, False, time.monotonic() - started, manifest)
            cache.remove_stale_tmp(plan.cache_dir)
            work_dir = cache.new_work_dir(plan.cache_dir)
            try:
                manifest = _convert_into(plan, settings, work_dir, report, progress, started)
                cache.install(work_dir / "model", plan.model_dir, work_dir)
            finally:
                shutil.rmtree(work_dir, ignore_errors=True)
    except ConversionError:
        raise
    except OSError as exc:
        raise ConversionError(_describe_os_error(exc, plan.cache_dir)) from exc
    except MemoryError as exc:
        raise ConversionError(f"out of memory while converting {plan.source.spec!r}") from exc
    except Exception as exc:
        raise ConversionError(
            f"converting {plan.source.spec!r} failed: {type(exc).__name__}: {first_line(exc)}"
        ) from exc
    return ConversionResult(plan.model_dir, True, time.monotonic() - started, manifest)


def _convert_into(
    plan: ConversionPlan,
    settings: AppSettings,
    work_dir: Path,
    report: Report,
    progress: bool,
    started: float,
) -> dict[str, object]:
    from llm_local.convert.converter import (
        check_architecture,
        convert_to_ct2,
        write_tokenizer_files,
    )
    from llm_local.convert.reference import answer_probe, complete_reference, write_reference
    from llm_local.core.numerics import ProbeItem

    with quiet_libraries(progress):
        found = materialize(plan.source, settings.model, work_dir, report)
        hf_dir, preloaded = found.hf_dir, found.preloaded
        facts = check_architecture(hf_dir)
        report(f"converting to CTranslate2 ({plan.quantization})")
        output = work_dir / "model"
        answered: list[tuple[tuple[ProbeItem, ...], float]] = []

        def answer_before_converting(model: Any, tokenizer: Any) -> None:
            report("recording the numerics reference (unquantized answers to the probe set)")
            probe_tokenizer = work_dir / "probe-tokenizer"
            write_tokenizer_files(tokenizer, hf_dir, probe_tokenizer)
            answered.append(answer_probe(model, probe_tokenizer))

        convert_to_ct2(
            hf_dir,
            output,
            plan.quantization,
            preloaded_model=preloaded,
            on_model=answer_before_converting,
        )
        del preloaded
        items, nll = answered[0]
        write_reference(output, complete_reference(items, nll, output))
    manifest: dict[str, object] = {
        "key": plan.key,
        "inputs": plan.inputs,
        "source": plan.source.spec,
        "kind": plan.source.kind,
        "revision": plan.source.revision,
        "resolved_revision": found.resolved_revision,
        "fingerprint": plan.source.fingerprint,
        "quantization": plan.quantization,
        "model": facts.as_dict(),
        "versions": {
            dist: _version(dist) for dist in ("llm-local", "ctranslate2", "transformers", "torch")
        },
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "conversion_seconds": round(time.monotonic() - started, 2),
        "files": sorted(path.name for path in output.iterdir()),
    }
    cache.write_manifest(output, manifest)  # last: its presence marks the model complete
    return manifest


def has_reference(model_dir: Path) -> bool:
    """Whether the converted model carries a numerics reference of the current probe."""
    from llm_local.convert.reference import read_reference

    return read_reference(model_dir) is not None


def _add_reference(
    plan: ConversionPlan, settings: AppSettings, report: Report, progress: bool
) -> dict[str, object]:
    """Give an entry converted before references existed (or with an older probe) its
    reference: the source is loaded once more, nothing is converted again."""
    from llm_local.convert.reference import record_reference, write_reference

    report("the cached model has no numerics reference yet: recording it")
    work_dir = cache.new_work_dir(plan.cache_dir)
    try:
        with quiet_libraries(progress):
            model, _ = load_unquantized(plan.source, settings.model, work_dir, report)
            write_reference(plan.model_dir, record_reference(model, plan.model_dir))
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    manifest = cache.read_complete(plan.model_dir, plan.key)
    assert manifest is not None  # held under the lock: nobody removed it meanwhile
    return manifest


@contextlib.contextmanager
def quiet_libraries(progress: bool) -> Iterator[None]:
    """transformers warns about things that do not concern a conversion (generation
    flags, tokenizer classes); keep errors, and progress bars only when asked."""
    import functools

    from tqdm.auto import tqdm
    from transformers import modeling_gguf_pytorch_utils as gguf_loading
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    bars_were_enabled = hf_logging.is_progress_bar_enabled()
    gguf_bar = getattr(gguf_loading, "tqdm", None)
    if not progress:
        hf_logging.disable_progress_bar()
        # The GGUF loader draws its bar with tqdm directly, ignoring the switch above.
        if gguf_bar is not None:
            gguf_loading.tqdm = functools.partial(tqdm, disable=True)
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars_were_enabled:
            hf_logging.enable_progress_bar()
        if gguf_bar is not None:
            gguf_loading.tqdm = gguf_bar


def _clean_orphans_if_idle(cache_dir: Path) -> None:
    """Remove what killed conversions left, unless a conversion is running right now.

    Best effort: a server may see the cache through a read-only mount.
    """
    with (
        contextlib.suppress(OSError),
        cache.conversion_lock(cache_dir, blocking=False) as acquired,
    ):
        if acquired:
            cache.remove_stale_tmp(cache_dir)


def _describe_os_error(exc: OSError, cache_dir: Path) -> str:
    if exc.errno == errno.ENOSPC:
        return (
            f"disk full while converting into {cache_dir} (free some space or move model.cache_dir)"
        )
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write to {cache_dir}: {exc.strerror} (set model.cache_dir elsewhere)"
    return f"file error while converting into {cache_dir}: {first_line(exc)}"


def _stderr_report(message: str) -> None:
    print(f"llm-local convert: {message}", file=sys.stderr, flush=True)


def _silent(message: str) -> None:
    pass


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None
