"""The converted-model cache: where a conversion lives, how it is marked complete, and
how it is put in place atomically.

Layout::

    <cache_dir>/.lock                              serializes conversions
    <cache_dir>/.tmp-XXXX/                         a conversion in progress (or a killed one)
    <cache_dir>/<source slug>/<quantization>-<key>/
        model.bin, tokenizer files, ..., manifest.json (written last)

`key` hashes every input that changes the result. A directory outside `.tmp-*` that
holds a manifest with its key is complete: it got there by one rename, after the
manifest was written and everything synced.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

from llm_local.convert.sources import ModelSource

MANIFEST_NAME = "manifest.json"
MODEL_FILE = "model.bin"
TMP_PREFIX = ".tmp-"
LOCK_NAME = ".lock"
# Bump when the directory's content changes shape, to convert again.
LAYOUT_VERSION = 1


def source_inputs(source: ModelSource, layout: int) -> dict[str, str]:
    """What names the source's content in a cache entry's key, and the entry's `layout`:
    the part every entry made from a source shares (conversions, references, copies)."""
    return {
        "layout": str(layout),
        "kind": source.kind,
        "source": source.identity,
        "revision": source.revision or "",
        "fingerprint": source.fingerprint,
    }


def conversion_inputs(source: ModelSource, quantization: str) -> dict[str, str]:
    """Everything that, when it changes, must produce a new conversion."""
    return {
        **source_inputs(source, LAYOUT_VERSION),
        "quantization": quantization,
        # A model converted by one CTranslate2 major version may not load in another.
        "ctranslate2_major": installed_version("ctranslate2").split(".")[0],
    }


def inputs_key(inputs: Mapping[str, str]) -> str:
    encoded = json.dumps(dict(inputs), sort_keys=True).encode()
    return hashlib.sha256(encoded).hexdigest()[:12]


def model_dir_for(cache_dir: Path, source: ModelSource, quantization: str, key: str) -> Path:
    return cache_dir / source.slug / f"{quantization}-{key}"


def read_complete(model_dir: Path, key: str) -> dict[str, object] | None:
    """The manifest of a complete conversion with this key, or None."""
    return read_entry(model_dir, {"key": key}, MODEL_FILE)


def read_entry(
    directory: Path, expected: Mapping[str, object], payload: str
) -> dict[str, object] | None:
    """The manifest of a complete cache entry, or None: it parses, holds every `expected`
    field with that value, and the entry's `payload` file is there (the manifest is
    written last, so a half-written entry has none)."""
    try:
        manifest = json.loads((directory / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict):
        return None
    if any(manifest.get(name) != value for name, value in expected.items()):
        return None
    return manifest if (directory / payload).is_file() else None


@contextlib.contextmanager
def conversion_lock(cache_dir: Path, *, blocking: bool = True) -> Iterator[bool]:
    """Hold the cache's lock; yields False when `blocking` is off and someone else holds it.

    Two `llm-local convert` runs at once (make test beside make run, or two replicas
    sharing a volume) then convert once: the second waits and finds the result.
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    with (cache_dir / LOCK_NAME).open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def remove_stale_tmp(cache_dir: Path) -> list[Path]:
    """Delete what killed conversions left. Call only while holding the lock: then no
    conversion is running, so every `.tmp-*` directory is an orphan."""
    removed = []
    for entry in cache_dir.glob(f"{TMP_PREFIX}*"):
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def new_work_dir(cache_dir: Path) -> Path:
    """A scratch directory on the cache's own filesystem, so the final rename is atomic."""
    return Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=cache_dir))


def write_manifest(model_dir: Path, manifest: Mapping[str, object]) -> None:
    write_json_atomically(model_dir / MANIFEST_NAME, manifest, indent=2, sort_keys=True)


def write_json_atomically(
    path: Path, data: Mapping[str, Any], *, indent: int | None = None, sort_keys: bool = False
) -> None:
    """A reader (or a power cut) sees the old file or the new one, never half of one."""
    partial = path.with_name(f"{path.name}.partial")
    text = json.dumps(dict(data), indent=indent, sort_keys=sort_keys) + "\n"
    partial.write_text(text, encoding="utf-8")
    _fsync_file(partial)
    partial.replace(path)


def install(built: Path, target: Path, work_dir: Path) -> None:
    """Move the finished `built` directory to `target` in one rename.

    A previous `target` (a forced reconversion) is first moved into `work_dir`, which
    is deleted afterwards: a kill between the two renames leaves no model, never half
    of one.
    """
    for path in built.iterdir():
        _fsync_file(path)
    _fsync_dir(built)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        target.rename(work_dir / "previous")
    built.rename(target)
    _fsync_dir(target.parent)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    # Makes the rename itself durable: after a power cut the directory entry exists.
    with contextlib.suppress(OSError):
        _fsync_file(path)


def installed_version(dist: str) -> str:
    """The installed distribution's version, or "none"."""
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "none"
