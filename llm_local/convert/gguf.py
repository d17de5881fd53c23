"""Dequantize a .gguf file into a plain float32 transformers model held in memory.

transformers reads GGUF files itself (`from_pretrained(dir, gguf_file=name)`), but
refuses to save such a model ("quantized with gguf and is not serializable") even
though the weights in memory are plain float32; dropping the quantizer marks fixes
that (FINDINGS.md). The model is handed to the CTranslate2 converter directly instead
of being written out (538 MB for SmolLM2-135M) and read back.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from llm_local.convert.errors import ConversionError, first_line


@contextlib.contextmanager
def parse_gguf_once() -> Iterator[None]:
    """Reuse one parse of the file across transformers' three readings of it.

    The tokenizer, the config and the weights each open a new GGUFReader (10+ s per
    parse of SmolLM2's 49k-token vocabulary on this 2-core machine), and the weights
    loader rebuilds the same tensor-name map once per module (~400 times). Both are
    pure functions of their arguments, so caching them for the duration of one load is
    safe; it took the model load from ~45 s to ~9 s here. The originals come back after.
    """
    import gguf

    original_reader: Callable[..., Any] = gguf.GGUFReader
    original_name_map: Callable[..., Any] = gguf.get_tensor_name_map
    readers: dict[tuple[str, str], Any] = {}

    def shared_reader(path: str | os.PathLike[str], mode: str = "r") -> Any:
        key = (os.fspath(path), mode)
        if key not in readers:
            readers[key] = original_reader(path, mode)
        return readers[key]

    gguf.GGUFReader = shared_reader
    gguf.get_tensor_name_map = functools.cache(original_name_map)
    try:
        yield
    finally:
        gguf.GGUFReader = original_reader
        gguf.get_tensor_name_map = original_name_map


def load_gguf(path: Path, hf_dir: Path) -> Any:
    """Load `path` as a float32 model; write its config, generation config and
    tokenizer files to `hf_dir` (what the converter reads besides the weights)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        with parse_gguf_once():
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
    except ValueError as exc:  # e.g. "GGUF model with architecture X is not supported yet."
        raise ConversionError(f"cannot read {path.name}: {first_line(exc)}") from exc

    # The weights are already dequantized; these marks only block saving the config.
    model.hf_quantizer = None
    with contextlib.suppress(AttributeError):
        del model.config.quantization_config
    model.config.architectures = [type(model).__name__]

    hf_dir.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(hf_dir)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(hf_dir)
    tokenizer.save_pretrained(hf_dir)
    keep_add_bos_token(tokenizer, hf_dir / "tokenizer_config.json")
    return model


def keep_add_bos_token(tokenizer: Any, config_path: Path) -> None:
    """Write the GGUF's ``tokenizer.ggml.add_bos_token`` (which transformers read into
    the tokenizer) into tokenizer_config.json, where serving looks for it: transformers
    5 leaves it out when it saves, and without it serving can only guess from the
    post-processor whether a plain prompt wants a BOS."""
    flag = getattr(tokenizer, "add_bos_token", None)
    if not isinstance(flag, bool) or not config_path.is_file():
        return
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if isinstance(config, dict) and "add_bos_token" not in config:
        config["add_bos_token"] = flag
        config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
