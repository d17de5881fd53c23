"""The configured model as an unquantized transformers model in memory, from any source.

Two users: conversion records the numerics reference from it (api.py, reference.py), and
the `transformers` backend serves it (backends/transformers). Both get the same weights
the same way: a hub snapshot or a local directory read by `from_pretrained`, a `.gguf`
file dequantized by transformers' GGUF reader (gguf.py).
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
    """Download a hub model, take a local directory as is, or dequantize a `.gguf` file
    into memory (its config and tokenizer files written to `work_dir`/hf)."""
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
    from llm_local.convert.gguf import load_gguf

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
) -> tuple[Any, Path]:
    """The model with unquantized weights (float32, or `dtype`, a torch dtype), in eval
    mode on the CPU, and the Hugging Face directory holding its tokenizer files."""
    found = materialize(source, model, work_dir, report)
    loaded = found.preloaded
    if loaded is None:
        from transformers import AutoModelForCausalLM

        options: dict[str, Any] = {}
        if dtype is not None:
            options["dtype"] = dtype
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
