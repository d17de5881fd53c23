"""LoRA adapters from settings ([adapters]: id = source), prepared once into the model cache.

A source is a PEFT adapter directory (adapter_config.json + adapter_model.safetensors), a
Hugging Face Hub repository holding one, a .gguf LoRA file, or "package:DIST/PATH". What a
backend needs from it:

- ``llama_cpp``: a GGUF LoRA (llama.cpp's ``llama_adapter_lora_init``). A .gguf source is
  used as is; a PEFT adapter is converted (gguf_lora.py) against the served base GGUF, into
  ``<cache_dir>/adapters/<slug>/gguf-<key>/adapter.gguf``, in a scratch directory renamed
  into place under the cache's lock, like a model (cache.py). `key` hashes the adapter's
  source and the base model's: a changed file converts again.
- ``transformers``: the PEFT directory as is (a hub repository's is downloaded into the
  model's download directory); a .gguf LoRA is llama.cpp's own format and is refused
  (`peft_adapter_dir`).
- ``ct2``: CTranslate2 applies no adapter at run time; nothing is prepared.

`find_adapter` is the load path's cheap look-up (a stat and one manifest); `ensure_adapters`
does the work (`llm-local convert`, or the llama_cpp backend's load when the cache lacks it).
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Literal

from llm_local.convert import cache
from llm_local.convert.errors import ConversionError, first_line
from llm_local.convert.sources import PACKAGE_PREFIX, ModelSource
from llm_local.settings.fields import absolute_path
from llm_local.settings.schema import AdapterSettings, AppSettings, ModelSettings

AdapterKind = Literal["peft_dir", "gguf", "hub"]
ADAPTER_FILE = "adapter.gguf"
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
LAYOUT_VERSION = 1
_HUB_REPO = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # org/name; anything else is a path


@dataclass(frozen=True, slots=True)
class AdapterSource:
    id: str
    spec: str
    kind: AdapterKind
    identity: str
    path: Path | None  # None for the hub
    fingerprint: str
    slug: str


def resolve_adapter(adapter: AdapterSettings) -> AdapterSource:
    """Identify an adapter's source without reading it; ConversionError when a local one
    is missing or is not an adapter."""
    spec = adapter.source
    fingerprint: str | None = None
    identity: str
    if spec.startswith(PACKAGE_PREFIX):
        dist_name, _, inner = spec.removeprefix(PACKAGE_PREFIX).partition("/")
        try:
            dist = metadata.distribution(dist_name)
        except metadata.PackageNotFoundError:
            raise ConversionError(
                f"adapter {adapter.id!r}: package {dist_name!r} is not installed"
            ) from None
        path = Path(str(dist.locate_file(inner)))
        identity = f"{dist_name}/{inner}"
        fingerprint = f"{dist.metadata['Name']}=={dist.version}"
    else:
        path = absolute_path(spec)
        identity = str(path)
    if path.is_file() and path.suffix.lower() == ".gguf":
        kind: AdapterKind = "gguf"
    elif path.is_dir() and (path / PEFT_CONFIG).is_file():
        kind = "peft_dir"
    elif path.exists():
        raise ConversionError(
            f"adapter {adapter.id!r}: {str(path)!r} is neither a PEFT adapter directory "
            f"(no {PEFT_CONFIG}) nor a .gguf LoRA file"
        )
    elif spec.startswith(PACKAGE_PREFIX) or not _HUB_REPO.match(spec):
        raise ConversionError(f"adapter {adapter.id!r}: {spec!r} not found")
    else:
        return AdapterSource(
            adapter.id, spec, "hub", spec, None, "hub", _slug(f"{adapter.id}--{spec}")
        )
    if fingerprint is None:
        fingerprint = _fingerprint(path)
    return AdapterSource(
        adapter.id, spec, kind, identity, path, fingerprint, _slug(f"{adapter.id}--{path.name}")
    )


def _fingerprint(path: Path) -> str:
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
    parts = []
    for file in files:
        stat = file.stat()
        parts.append(f"{file.name}:{stat.st_size}:{stat.st_mtime_ns}")
    return ";".join(parts)


def _slug(text: str) -> str:
    from llm_local.convert.sources import _slug as model_slug

    return model_slug(text)


def gguf_plan(
    source: AdapterSource, base: ModelSource, cache_dir: Path
) -> tuple[Path, str, dict[str, str]]:
    """(directory, key, inputs) of the converted GGUF LoRA for `source` on `base`."""
    inputs = {
        "layout": str(LAYOUT_VERSION),
        "adapter_kind": source.kind,
        "adapter": source.identity,
        "adapter_fingerprint": source.fingerprint,
        "base": base.identity,
        "base_fingerprint": base.fingerprint,
    }
    key = cache.inputs_key(inputs)
    return cache_dir / "adapters" / source.slug / f"gguf-{key}", key, inputs


def find_gguf_adapter(source: AdapterSource, base: ModelSource, cache_dir: Path) -> Path | None:
    """The adapter's GGUF LoRA when it needs no preparing or the cache holds it."""
    if source.kind == "gguf":
        return source.path
    directory, key, _ = gguf_plan(source, base, cache_dir)
    if _read_complete(directory, key) is None:
        return None
    return directory / ADAPTER_FILE


def _read_complete(directory: Path, key: str) -> dict[str, object] | None:
    return cache.read_entry(directory, {"key": key}, ADAPTER_FILE)


def ensure_gguf_adapter(
    source: AdapterSource, base: ModelSource, base_gguf: Path, model: ModelSettings
) -> Path:
    """The adapter's GGUF LoRA, converting it into the cache once (atomically, under the
    cache's lock). Raises ConversionError with a one-line reason."""
    found = find_gguf_adapter(source, base, model.cache_dir)
    if found is not None:
        return found
    directory, key, inputs = gguf_plan(source, base, model.cache_dir)
    try:
        with cache.conversion_lock(model.cache_dir):
            if _read_complete(directory, key) is not None:
                return directory / ADAPTER_FILE
            work = cache.new_work_dir(model.cache_dir)
            try:
                built = work / "adapter"
                built.mkdir()
                peft_dir = _peft_dir(source, model)
                from llm_local.convert.gguf_lora import convert_peft_to_gguf

                facts = convert_peft_to_gguf(peft_dir, base_gguf, built / ADAPTER_FILE)
                cache.write_manifest(
                    built,
                    {
                        "key": key,
                        "inputs": inputs,
                        "adapter": source.id,
                        "source": source.spec,
                        **facts,
                    },
                )
                cache.install(built, directory, work)
            finally:
                shutil.rmtree(work, ignore_errors=True)
    except ConversionError:
        raise
    except Exception as exc:
        raise ConversionError(
            f"adapter {source.id!r}: converting {source.spec!r} to a GGUF LoRA failed: "
            f"{type(exc).__name__}: {first_line(exc)}"
        ) from exc
    return directory / ADAPTER_FILE


def peft_adapter_dir(source: AdapterSource, model: ModelSettings) -> Path:
    """The adapter's PEFT directory (what the transformers backend applies); a GGUF LoRA is
    refused by name (ConversionError): PEFT cannot read llama.cpp's format."""
    if source.kind == "gguf":
        raise ConversionError(
            f"adapter {source.id!r}: {source.spec!r} is a GGUF LoRA, which only the llama_cpp "
            "backend applies; the transformers backend takes a PEFT adapter directory "
            f"({PEFT_CONFIG} + {PEFT_WEIGHTS}) or a hub repository holding one"
        )
    return _peft_dir(source, model)


def _peft_dir(source: AdapterSource, model: ModelSettings) -> Path:
    if source.path is not None:
        return source.path
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(
                source.spec,
                cache_dir=model.download_dir,
                local_files_only=model.offline,
                allow_patterns=[PEFT_CONFIG, PEFT_WEIGHTS],
            )
        )
    except Exception as exc:  # huggingface_hub's errors are many; each means "not there"
        raise ConversionError(
            f"adapter {source.id!r}: cannot fetch hub repository {source.spec!r}: "
            f"{type(exc).__name__}: {first_line(exc)}"
        ) from exc


def ensure_adapters(settings: AppSettings) -> dict[str, Path]:
    """What `llm-local convert` prepares for the configured backend: each adapter's GGUF
    LoRA for llama_cpp (against a local base GGUF; a hub base's adapters are prepared when
    the backend loads, after it downloaded the base). Other backends: nothing yet."""
    from llm_local.convert.sources import resolve_source

    if settings.backend != "llama_cpp" or not settings.adapters:
        return {}
    base = resolve_source(settings.model)
    if base.kind != "gguf" or base.path is None:
        return {}
    return {
        adapter.id: ensure_gguf_adapter(resolve_adapter(adapter), base, base.path, settings.model)
        for adapter in settings.adapters
    }
