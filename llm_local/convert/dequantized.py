"""A GGUF's dequantized weights kept in the model cache, read back as they are.

transformers' GGUF reader dequantizes in Python at every load: 10-17 s for the 135M
development model on a 2-core machine, at every start of the `transformers` backend. The
same float32 weights saved as safetensors load in about a second. The price is disk, 4
bytes a parameter (538 MB for SmolLM2-135M), so only the backend that needs the weights at
every start keeps them (`transformers.keep_dequantized`); a conversion or a numerics
reference reads them when they are there (unquantized.py), and never writes them.

Layout, beside the converted models (cache.py)::

    <cache_dir>/<source slug>/dequantized-<key>/
        config.json, model.safetensors, tokenizer files, manifest.json (written last)

`key` hashes the source's identity and fingerprint (a changed file is dequantized again)
and transformers' major version, whose loader reads the directory.
"""

from __future__ import annotations

import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from llm_local.convert import cache
from llm_local.convert.sources import ModelSource

WEIGHTS_FILE = "model.safetensors"
# Bump when the directory's content changes shape, to dequantize again.
LAYOUT_VERSION = 1


def dequantized_inputs(source: ModelSource) -> dict[str, str]:
    """Everything that, when it changes, must give another kept copy."""
    return {
        **cache.source_inputs(source, LAYOUT_VERSION),
        "transformers_major": cache.installed_version("transformers").split(".")[0],
    }


def dequantized_dir(cache_dir: Path, source: ModelSource) -> Path:
    key = cache.inputs_key(dequantized_inputs(source))
    return cache_dir / source.slug / f"dequantized-{key}"


def find_dequantized(cache_dir: Path, source: ModelSource) -> Path | None:
    """The complete kept copy of `source` (a `.gguf` file), or None."""
    if source.kind != "gguf":
        return None
    directory = dequantized_dir(cache_dir, source)
    expected = {"inputs": dequantized_inputs(source)}
    return directory if cache.read_entry(directory, expected, WEIGHTS_FILE) else None


def keep_dequantized(
    model: Any, hf_dir: Path, cache_dir: Path, source: ModelSource, *, wait: bool = False
) -> Path | None:
    """Save `model` (dequantized from `source`, its tokenizer files in `hf_dir`) into the
    cache; returns where, or None when the copy is already there or, unless `wait`,
    another process holds the cache (it converts, or keeps the same copy): a server
    starting then serves at once and keeps the copy at a later start.

    Written in a scratch directory and moved into place by one rename under the cache's
    lock, as conversions are: a reader sees the whole copy or none. OSError (a full disk,
    a read-only cache) reaches the caller, which serves without keeping."""
    target = dequantized_dir(cache_dir, source)
    with cache.conversion_lock(cache_dir, blocking=wait) as held:
        if not held or find_dequantized(cache_dir, source) is not None:
            return None
        work_dir = cache.new_work_dir(cache_dir)
        try:
            built = work_dir / "dequantized"
            model.save_pretrained(built, safe_serialization=True)
            for path in hf_dir.iterdir():
                if path.is_file() and not (built / path.name).exists():
                    shutil.copy2(path, built / path.name)
            cache.write_manifest(
                built,
                {
                    "inputs": dequantized_inputs(source),
                    "source": source.spec,
                    "created": datetime.now(UTC).isoformat(timespec="seconds"),
                    "files": sorted(path.name for path in built.iterdir()),
                },
            )
            cache.install(built, target, work_dir)
        finally:
            shutil.rmtree(work_dir, ignore_errors=True)
    return target
