"""A PEFT LoRA adapter written as a GGUF LoRA that llama.cpp applies to a base GGUF.

The format is what llama.cpp's own ``convert_lora_to_gguf.py`` writes and
``src/llama-adapter.cpp`` reads:

- metadata ``general.architecture`` (the base model's), ``general.type = "adapter"``,
  ``adapter.type = "lora"``, ``adapter.lora.alpha`` (float32; llama.cpp scales by
  alpha / rank, as PEFT does);
- for each adapted weight, two tensors named after the base tensor: ``<name>.lora_a`` shaped
  (rank, in_features) and ``<name>.lora_b`` shaped (out_features, rank): PEFT's own
  ``lora_A`` / ``lora_B`` layout (gguf's writer reverses the dims into ggml's order);
- the base tensor names come from gguf's ``TensorNameMap`` (``model.layers.0.self_attn.q_proj``
  -> ``blk.0.attn_q``);
- for the llama architecture, the Hugging Face to GGUF conversion permuted the rows of the
  query and key weights (rotary embedding layout: ``LlamaModel.permute``); the adapter's
  delta B·A must be permuted alike, which means permuting B's rows.

Refused by name: DoRA, adapters that also train whole modules (``modules_to_save``),
per-module rank or alpha patterns, and weights the name map does not know.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from llm_local.convert.errors import ConversionError

_PEFT_PREFIX = "base_model.model."
# Architectures whose GGUF conversion permutes q/k rows (convert_hf_to_gguf.py LlamaModel).
_PERMUTED_ARCHITECTURES = frozenset({"llama"})


def base_facts(base_gguf: Path) -> dict[str, Any]:
    """The base model's architecture, block count and head counts, from its GGUF header."""
    import gguf

    reader = gguf.GGUFReader(base_gguf)

    def value(key: str) -> Any:
        field = reader.get_field(key)
        if field is None:
            return None
        return field.contents()

    architecture = str(value("general.architecture"))
    return {
        "architecture": architecture,
        "blocks": int(value(f"{architecture}.block_count")),
        "heads": int(value(f"{architecture}.attention.head_count")),
        "kv_heads": int(
            value(f"{architecture}.attention.head_count_kv")
            or value(f"{architecture}.attention.head_count")
        ),
    }


def permute_rows(weights: Any, heads: int) -> Any:
    """convert_hf_to_gguf.py's LlamaModel.permute on the output rows of `weights`."""
    shape = weights.shape
    return (
        weights.reshape(heads, 2, shape[0] // heads // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)
    )


def convert_peft_to_gguf(peft_dir: Path, base_gguf: Path, out: Path) -> dict[str, object]:
    """Write `peft_dir`'s adapter as a GGUF LoRA for `base_gguf`; returns facts for the
    manifest (rank, alpha, tensors written)."""
    import gguf
    import numpy as np
    from safetensors.numpy import load_file

    config = json.loads((peft_dir / "adapter_config.json").read_text(encoding="utf-8"))
    _check_supported(config)
    weights_path = peft_dir / "adapter_model.safetensors"
    if not weights_path.is_file():
        raise ConversionError(f"{peft_dir} has no adapter_model.safetensors")
    facts = base_facts(base_gguf)
    architecture = facts["architecture"]
    arch = next((a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == architecture), None)
    if arch is None:
        raise ConversionError(f"gguf does not know the base architecture {architecture!r}")
    names = gguf.get_tensor_name_map(arch, facts["blocks"])
    rank = int(config["r"])
    alpha = float(config["lora_alpha"])
    if config.get("use_rslora"):
        # PEFT scales rsLoRA by alpha / sqrt(r); llama.cpp by alpha / r.
        alpha = alpha * math.sqrt(rank)
    tensors = load_file(str(weights_path))
    pairs: dict[str, dict[str, Any]] = {}
    for key, array in tensors.items():
        stem = key.removeprefix(_PEFT_PREFIX)
        for part in ("lora_A", "lora_B"):
            marker = f".{part}."
            if marker in stem:
                module = stem.split(marker)[0]
                pairs.setdefault(module, {})[part] = array.astype(np.float32)
                break
        else:
            raise ConversionError(f"unexpected tensor {key!r} in {weights_path.name}")
    writer = gguf.GGUFWriter(str(out), architecture)
    writer.add_string(gguf.Keys.General.TYPE, gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    for module, pair in sorted(pairs.items()):
        if set(pair) != {"lora_A", "lora_B"}:
            raise ConversionError(f"{module}: lora_A and lora_B must both be present")
        target = names.get_name(f"{module}.weight", try_suffixes=(".weight",))
        if target is None:
            raise ConversionError(f"no GGUF tensor for {module!r} ({architecture})")
        lora_a, lora_b = pair["lora_A"], pair["lora_B"]
        if architecture in _PERMUTED_ARCHITECTURES:
            if module.endswith("q_proj"):
                lora_b = permute_rows(lora_b, facts["heads"])
            elif module.endswith("k_proj"):
                lora_b = permute_rows(lora_b, facts["kv_heads"])
        writer.add_tensor(f"{target}.lora_a", np.ascontiguousarray(lora_a))
        writer.add_tensor(f"{target}.lora_b", np.ascontiguousarray(lora_b))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"rank": rank, "alpha": alpha, "modules": len(pairs), "architecture": architecture}


def _check_supported(config: dict[str, Any]) -> None:
    if config.get("peft_type", "LORA") != "LORA":
        raise ConversionError(f"a {config.get('peft_type')} adapter is not a LoRA adapter")
    if config.get("use_dora"):
        raise ConversionError("DoRA adapters cannot be applied by llama.cpp")
    if config.get("modules_to_save"):
        raise ConversionError(
            f"the adapter also replaces whole modules ({config['modules_to_save']}): "
            "llama.cpp applies only low-rank deltas"
        )
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise ConversionError("per-module rank or alpha patterns are not supported")
    if config.get("fan_in_fan_out"):
        raise ConversionError("fan_in_fan_out adapters (Conv1D layers) are not supported")
