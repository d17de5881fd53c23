"""A PEFT adapter written as a GGUF LoRA: names, shapes, metadata, the q/k row permutation.

The base "model" here is a GGUF holding only the header facts the conversion reads
(architecture, block and head counts); the end-to-end test (tests/e2e/test_lora_adapters.py)
loads a converted adapter into llama.cpp on the real model and compares its answers.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from llm_local.convert.errors import ConversionError
from llm_local.convert.gguf_lora import convert_peft_to_gguf, permute_rows

HEADS, KV_HEADS, HEAD_DIM, WIDTH, RANK = 4, 2, 4, 16, 2


def base_gguf(path: Path) -> Path:
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(2)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def peft_adapter(directory: Path, **config: object) -> dict[str, np.ndarray]:
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    out_rows = {"q_proj": HEADS * HEAD_DIM, "k_proj": KV_HEADS * HEAD_DIM, "v_proj": 8}
    tensors = {}
    for module, rows in out_rows.items():
        stem = f"base_model.model.model.layers.1.self_attn.{module}"
        tensors[f"{stem}.lora_A.weight"] = rng.standard_normal((RANK, WIDTH)).astype(np.float32)
        tensors[f"{stem}.lora_B.weight"] = rng.standard_normal((rows, RANK)).astype(np.float32)
    directory.mkdir()
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    settings = {"peft_type": "LORA", "r": RANK, "lora_alpha": 4, **config}
    (directory / "adapter_config.json").write_text(json.dumps(settings))
    return tensors


def read(path: Path) -> tuple[dict[str, object], dict[str, np.ndarray]]:
    import gguf

    reader = gguf.GGUFReader(path)
    fields = {name: field.contents() for name, field in reader.fields.items()}
    tensors = {t.name: np.array(t.data) for t in reader.tensors}
    return fields, tensors


def test_tensors_are_named_after_the_base_tensors_with_the_adapter_metadata(
    tmp_path: Path,
) -> None:
    peft_adapter(tmp_path / "peft")

    facts = convert_peft_to_gguf(
        tmp_path / "peft", base_gguf(tmp_path / "base.gguf"), tmp_path / "a.gguf"
    )

    fields, tensors = read(tmp_path / "a.gguf")
    assert fields["general.architecture"] == "llama"
    assert fields["general.type"] == "adapter"
    assert fields["adapter.type"] == "lora"
    assert fields["adapter.lora.alpha"] == pytest.approx(4.0)
    assert sorted(tensors) == [
        f"blk.1.{name}.weight.lora_{part}"
        for name in ("attn_k", "attn_q", "attn_v")
        for part in ("a", "b")
    ]
    assert tensors["blk.1.attn_q.weight.lora_a"].shape == (RANK, WIDTH)
    assert tensors["blk.1.attn_q.weight.lora_b"].shape == (HEADS * HEAD_DIM, RANK)
    assert facts == {"rank": RANK, "alpha": 4.0, "modules": 3, "architecture": "llama"}


def test_query_and_key_deltas_are_permuted_as_the_base_rows_were(tmp_path: Path) -> None:
    source = peft_adapter(tmp_path / "peft")

    convert_peft_to_gguf(tmp_path / "peft", base_gguf(tmp_path / "base.gguf"), tmp_path / "a.gguf")

    _, tensors = read(tmp_path / "a.gguf")
    stem = "base_model.model.model.layers.1.self_attn"
    for module, name, heads in (("q_proj", "attn_q", HEADS), ("k_proj", "attn_k", KV_HEADS)):
        a, b = source[f"{stem}.{module}.lora_A.weight"], source[f"{stem}.{module}.lora_B.weight"]
        delta = tensors[f"blk.1.{name}.weight.lora_b"] @ tensors[f"blk.1.{name}.weight.lora_a"]
        # The delta B·A lands on the base weight's permuted rows: permute(B·A).
        np.testing.assert_allclose(delta, permute_rows(b @ a, heads), rtol=1e-6)
    v = tensors["blk.1.attn_v.weight.lora_b"]
    np.testing.assert_array_equal(v, source[f"{stem}.v_proj.lora_B.weight"])  # not permuted


def test_rslora_alpha_is_rescaled_to_llama_cpps_alpha_over_rank(tmp_path: Path) -> None:
    peft_adapter(tmp_path / "peft", use_rslora=True)

    convert_peft_to_gguf(tmp_path / "peft", base_gguf(tmp_path / "base.gguf"), tmp_path / "a.gguf")

    fields, _ = read(tmp_path / "a.gguf")
    assert float(fields["adapter.lora.alpha"]) / RANK == pytest.approx(4 / np.sqrt(RANK))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("config", "named"),
    [
        ({"use_dora": True}, "DoRA"),
        ({"modules_to_save": ["lm_head"]}, "whole modules"),
        ({"rank_pattern": {"q_proj": 4}}, "rank or alpha patterns"),
    ],
)
def test_what_llama_cpp_cannot_apply_is_refused_by_name(
    tmp_path: Path, config: dict[str, object], named: str
) -> None:
    peft_adapter(tmp_path / "peft", **config)

    with pytest.raises(ConversionError, match=named):
        convert_peft_to_gguf(
            tmp_path / "peft", base_gguf(tmp_path / "base.gguf"), tmp_path / "a.gguf"
        )
