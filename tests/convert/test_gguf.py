"""What the GGUF loader writes beside the weights (the model itself: tests/e2e)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

from llm_local.convert.gguf import keep_add_bos_token


def test_the_gguf_add_bos_token_flag_reaches_tokenizer_config(tmp_path: Path) -> None:
    config = tmp_path / "tokenizer_config.json"
    config.write_text(json.dumps({"bos_token": "<s>"}))

    keep_add_bos_token(SimpleNamespace(add_bos_token=True), config)

    assert json.loads(config.read_text()) == {"bos_token": "<s>", "add_bos_token": True}


def test_a_flag_already_written_or_unknown_is_left_alone(tmp_path: Path) -> None:
    config = tmp_path / "tokenizer_config.json"
    config.write_text(json.dumps({"add_bos_token": False}))

    keep_add_bos_token(SimpleNamespace(add_bos_token=True), config)
    keep_add_bos_token(SimpleNamespace(), config)

    assert json.loads(config.read_text()) == {"add_bos_token": False}
