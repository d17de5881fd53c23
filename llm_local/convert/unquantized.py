"""The configured model as an unquantized transformers model in memory, from any source.

Two users: conversion records the numerics reference from it (api.py, reference.py), and
the `transformers` backend serves it (backends/transformers). Both get the same weights
the same way: a hub snapshot or a local directory read by `from_pretrained`, a `.gguf`
file dequantized by transformers' GGUF reader (gguf.py), or read back from the copy the
`transformers` backend keeps in the model cache (dequantized.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llm_local.convert.errors import ConversionError, first_line
from llm_local.convert.sources import ModelSource
from llm_local.settings.schema import ModelSettings

Report = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class Materialized:
    """A Hugging Face directory for a source (config and tokenizer files, and the weights
    unless they are already in memory)."""

    hf_dir: Path
    preloaded: Any  # the model, when the source had to be loaded to get a directory
    resolved_revision: str | None  # the hub commit, when there is one


def materialize(
    source: ModelSource, model: ModelSettings, work_dir: Path, report: Report
) -> Materialized:
    """Download a hub model, take a local directory as is, read a `.gguf` file's kept
    dequantized copy, or dequantize the file into memory (its config and tokenizer files
    written to `work_dir`/hf)."""
    if source.kind == "hub":
        from llm_local.convert.hub import download

        report(f"fetching {source.spec} from the Hugging Face Hub")
        snapshot, commit = download(
            source.spec, source.revision, model.download_dir, offline=model.offline
        )
        return Materialized(snapshot, None, commit)
    assert source.path is not None
    if source.kind == "hf_dir":
        return Materialized(source.path, None, None)
    from llm_local.convert.dequantized import find_dequantized
    from llm_local.convert.gguf import load_gguf

    kept = find_dequantized(model.cache_dir, source)
    if kept is not None:
        report(f"reading the dequantized copy of {source.path.name} kept at {kept}")
        return Materialized(kept, None, None)
    report(f"dequantizing {source.path.name} (GGUF)")
    hf_dir = work_dir / "hf"
    return Materialized(hf_dir, load_gguf(source.path, hf_dir), None)


def load_unquantized(
    source: ModelSource,
    model: ModelSettings,
    work_dir: Path,
    report: Report,
    *,
    dtype: Any = None,
    attn_implementation: str | None = None,
    keep_dequantized: bool = False,
) -> tuple[Any, Path]:
    """The model with unquantized weights (float32, or `dtype`, a torch dtype), in eval
    mode on the CPU, and the Hugging Face directory holding its tokenizer files.

    `keep_dequantized`: a `.gguf` source dequantized now is saved into the model cache,
    for later loads to read as is (dequantized.py); failing to save only costs that."""
    found = materialize(source, model, work_dir, report)
    loaded = found.preloaded
    if loaded is not None and keep_dequantized:
        _keep(loaded, found.hf_dir, source, model, report)
    if loaded is None:
        from transformers import AutoModelForCausalLM

        options: dict[str, Any] = {}
        if dtype is not None:
            options["dtype"] = dtype
        elif source.kind == "gguf":  # the kept copy: float32, as dequantized
            import torch

            options["dtype"] = torch.float32
        if attn_implementation is not None:
            options["attn_implementation"] = attn_implementation
        try:
            loaded = AutoModelForCausalLM.from_pretrained(found.hf_dir, **options)
        except (OSError, ValueError) as exc:
            raise ConversionError(
                f"transformers cannot load {source.spec!r}: {first_line(exc)}"
            ) from exc
    else:
        # A dequantized GGUF model: float32 weights, transformers' default attention.
        if dtype is not None:
            loaded = loaded.to(dtype)
        if attn_implementation is not None:
            loaded.set_attn_implementation(attn_implementation)
    return loaded.eval(), found.hf_dir


def _keep(
    loaded: Any, hf_dir: Path, source: ModelSource, model: ModelSettings, report: Report
) -> None:
    from llm_local.convert.dequantized import keep_dequantized

    try:
        kept = keep_dequantized(loaded, hf_dir, model.cache_dir, source)
    except OSError as exc:
        report(f"could not keep the dequantized copy in {model.cache_dir}: {first_line(exc)}")
        return
    if kept is not None:
        report(f"kept the dequantized copy for later loads at {kept}")
