"""`llm-local convert`: prepare the configured model in the cache (once).

Prints one summary line on success. On failure prints exactly one line,
``llm-local convert: error: <what and why>``, and exits non-zero (1 for a failed
conversion, 2 for bad settings or arguments); ``--verbose`` adds the traceback.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from typing import TYPE_CHECKING

from llm_local.settings.fields import COMPUTE_TYPES

if TYPE_CHECKING:
    from llm_local.settings.schema import AppSettings

PROG = "llm-local convert"
EXIT_FAILED = 1
EXIT_BAD_SETTINGS = 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--force", action="store_true", help="convert even if the cache has it")
    parser.add_argument(
        "--model", help="model source instead of model.name (hub id, path, package:…)"
    )
    parser.add_argument("--revision", help="hub revision instead of model.revision")
    parser.add_argument(
        "--quantization",
        choices=COMPUTE_TYPES,
        help="weight type instead of model.quantization",
    )
    parser.add_argument("--cache-dir", help="cache directory instead of model.cache_dir")
    parser.add_argument("--env", help="settings environment (default: $ENV, else development)")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    parser.add_argument("--verbose", action="store_true", help="show tracebacks on failure")


def run(args: argparse.Namespace) -> int:
    from llm_local.convert.adapters import ensure_adapters
    from llm_local.convert.api import ensure_converted
    from llm_local.convert.errors import ConversionError
    from llm_local.settings.errors import SettingsError
    from llm_local.settings.loader import load_settings

    overrides = {
        key: value
        for key, value in (
            ("model.name", args.model),
            ("model.revision", args.revision),
            ("model.quantization", args.quantization),
            ("model.cache_dir", args.cache_dir),
        )
        if value is not None
    }
    try:
        settings = load_settings(args.env, overrides=overrides)
        if settings.backend == "llama_cpp":
            return _record_gguf_reference(settings, quiet=args.quiet)
        if settings.backend == "transformers":
            return _keep_dequantized_copy(settings, quiet=args.quiet)
        result = ensure_converted(settings, force=args.force, progress=not args.quiet)
        adapters = ensure_adapters(settings)
    except SettingsError as exc:
        return _fail(args, exc, "; ".join(str(p) for p in exc.problems), EXIT_BAD_SETTINGS)
    except ConversionError as exc:
        return _fail(args, exc, str(exc), EXIT_FAILED)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; the cache holds what it held before", file=sys.stderr)
        return 130
    if result.converted:
        print(f"converted {settings.model.name} in {result.seconds:.1f} s: {result.model_dir}")
    else:
        print(f"already converted at {result.model_dir} (checked in {result.seconds:.2f} s)")
    for adapter_id, path in adapters.items():
        print(f"adapter {adapter_id}: {path}")
    return 0


def _record_gguf_reference(settings: AppSettings, *, quiet: bool) -> int:
    """The llama_cpp backend serves the GGUF as is: nothing to convert, only the
    numerics reference its check at load compares with (convert/gguf_reference.py)."""
    from llm_local.convert.adapter_reference import ensure_adapter_references
    from llm_local.convert.adapters import ensure_adapters
    from llm_local.convert.api import _silent, _stderr_report
    from llm_local.convert.gguf_reference import ensure_gguf_reference

    report = _silent if quiet else _stderr_report
    entry, recorded = ensure_gguf_reference(settings, report)
    if recorded:
        print(f"recorded the numerics reference of {settings.model.name}: {entry}")
    else:
        print(f"the numerics reference of {settings.model.name} is already at {entry}")
    # Each adapter's GGUF LoRA, and the reference its check at load compares with.
    adapters = ensure_adapters(settings)
    references = ensure_adapter_references(settings, report)
    for adapter_id, path in adapters.items():
        print(f"adapter {adapter_id}: {path} (numerics reference: {references[adapter_id]})")
    _prepare_llama_cpp_weights(settings)
    return 0


def _prepare_llama_cpp_weights(settings: AppSettings) -> None:
    """`llama_cpp.weights`: the re-laid copy, and with "auto" the verdict of this machine,
    written now so that a server on a read-only cache finds them (weights.py)."""
    from llm_local.backends.base import BackendLoadError
    from llm_local.backends.llama_cpp.library import library
    from llm_local.backends.llama_cpp.loader import plan_from_settings, served_file

    try:
        served = served_file(library(), plan_from_settings(settings))
    except BackendLoadError as exc:
        print(f"the weights are left to the server's start: {exc}")
        return
    print(f"weights served by the llama_cpp backend ({settings.llama_cpp.weights}): {served}")


def _keep_dequantized_copy(settings: AppSettings, *, quiet: bool) -> int:
    """The transformers backend reads its source as is: what it can be spared at every
    start is a GGUF's dequantization (convert/dequantized.py)."""
    import tempfile
    from pathlib import Path

    from llm_local.convert.api import _silent, _stderr_report, quiet_libraries
    from llm_local.convert.dequantized import find_dequantized, keep_dequantized
    from llm_local.convert.errors import ConversionError
    from llm_local.convert.gguf import load_gguf
    from llm_local.convert.sources import resolve_source

    report = _silent if quiet else _stderr_report
    source = resolve_source(settings.model)
    cache_dir = settings.model.cache_dir
    if source.kind != "gguf" or not settings.transformers.keep_dequantized:
        print(f"nothing to prepare: the transformers backend reads {source.spec} at start")
        return 0
    assert source.path is not None
    kept = find_dequantized(cache_dir, source)
    if kept is None:
        with tempfile.TemporaryDirectory(prefix="llm-local-dequantize-") as work:
            report(f"dequantizing {source.path.name} (GGUF)")
            with quiet_libraries(progress=not quiet):
                model = load_gguf(source.path, Path(work) / "hf")
            try:
                keep_dequantized(model, Path(work) / "hf", cache_dir, source, wait=True)
            except OSError as exc:
                raise ConversionError(f"cannot keep the dequantized copy: {exc}") from exc
        kept = find_dequantized(cache_dir, source)
        print(f"kept the dequantized copy of {settings.model.name}: {kept}")
    else:
        print(f"the dequantized copy of {settings.model.name} is already at {kept}")
    return 0


def _fail(args: argparse.Namespace, exc: BaseException, message: str, code: int) -> int:
    if args.verbose:
        traceback.print_exception(exc, file=sys.stderr)
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    """Entry point for `python -m llm_local.convert.command` (what `llm-local convert` runs)."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
