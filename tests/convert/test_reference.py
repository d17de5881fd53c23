"""reference.json: written atomically, read back, refused when stale or damaged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llm_local.convert.reference import (
    PROBE_PROMPTS,
    PROBE_VERSION,
    REFERENCE_FILE,
    probe_prompt_ids,
    read_reference,
    write_reference,
)
from llm_local.core.numerics import Anchor, ProbeItem, Reference

REFERENCE = Reference(
    PROBE_VERSION, 8, (ProbeItem((1, 2), (3, 4)),), nll=0.6, anchor=Anchor(0.61, 0.7)
)


def test_written_reference_reads_back_and_leaves_no_partial_file(tmp_path: Path) -> None:
    write_reference(tmp_path, REFERENCE)
    assert read_reference(tmp_path) == REFERENCE
    assert [p.name for p in tmp_path.iterdir()] == [REFERENCE_FILE]


def test_a_reference_of_another_probe_version_does_not_count(tmp_path: Path) -> None:
    stale = Reference(PROBE_VERSION - 1, 8, REFERENCE.items, 0.6, REFERENCE.anchor)
    write_reference(tmp_path, stale)
    assert read_reference(tmp_path) is None


@pytest.mark.parametrize("content", ["", "{", "[]", '{"items": []}', json.dumps({"nll": 1})])
def test_a_damaged_reference_does_not_count(tmp_path: Path, content: str) -> None:
    (tmp_path / REFERENCE_FILE).write_text(content)
    assert read_reference(tmp_path) is None


def test_no_reference_file_means_none(tmp_path: Path) -> None:
    assert read_reference(tmp_path) is None


@pytest.mark.model
def test_probe_prompts_are_rendered_with_the_models_chat_template(test_model_dir: Path) -> None:
    from llm_local.backends.hf_tokenizer import HFTokenizer

    prompts = probe_prompt_ids(test_model_dir)
    assert len(prompts) == len(PROBE_PROMPTS)
    tokenizer = HFTokenizer.from_directory(test_model_dir)
    pieces = tokenizer.convert_ids_to_tokens(prompts[0])
    assert pieces.count("<|im_start|>") == 3  # SmolLM2's template adds its system turn
    assert tokenizer.decode(prompts[0]).endswith(
        "user\nWhat is the capital of France?\nassistant\n"
    )


@pytest.mark.model
def test_the_test_model_carries_a_reference_made_from_its_own_prompts(
    test_model_dir: Path,
) -> None:
    reference = read_reference(test_model_dir)
    assert reference is not None
    assert [item.prompt_ids for item in reference.items] == probe_prompt_ids(test_model_dir)
