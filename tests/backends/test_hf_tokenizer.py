"""HFTokenizer: a model directory's tokenizer, chat template and end tokens."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace

from llm_local.backends.base import ModelTokenizer
from llm_local.backends.hf_tokenizer import HFTokenizer, TokenizerLoadError

TINY_VOCAB = {"[UNK]": 0, "hello": 1, "world": 2, "<|eot_id|>": 3, "</s>": 4, "<s>": 5}


@pytest.fixture
def tiny_dir(tmp_path: Path) -> Path:
    """A model directory with a six-word tokenizer and nothing else."""
    tokenizer = Tokenizer(WordLevel(TINY_VOCAB, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = Whitespace()
    tokenizer.add_special_tokens(["<|eot_id|>", "</s>", "<s>"])
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    return tmp_path


def write_json(path: Path, data: object) -> None:
    path.write_text(json.dumps(data), encoding="utf-8")


# -- the real SmolLM2 tokenizer --------------------------------------------------------------


@pytest.fixture(scope="module")
def smol(test_model_dir: Path) -> HFTokenizer:
    return HFTokenizer.from_directory(test_model_dir)


@pytest.mark.model
def test_smollm2_tokenizer_implements_the_protocol(smol: HFTokenizer) -> None:
    assert isinstance(smol, ModelTokenizer)


@pytest.mark.model
def test_smollm2_chat_template_and_special_tokens(smol: HFTokenizer) -> None:
    assert smol.chat_template is not None
    assert "<|im_start|>" in smol.chat_template
    assert smol.special_tokens["bos_token"] == "<|im_start|>"
    assert smol.special_tokens["eos_token"] == "<|im_end|>"


@pytest.mark.model
def test_smollm2_end_tokens_hold_the_end_of_turn(smol: HFTokenizer) -> None:
    im_end = smol.encode("<|im_end|>")
    endoftext = smol.encode("<|endoftext|>")
    assert len(im_end) == len(endoftext) == 1
    assert {im_end[0], endoftext[0]} <= smol.end_token_ids


@pytest.mark.model
def test_a_byte_level_vocabulary_has_no_byte_fallback_pieces(smol: HFTokenizer) -> None:
    # SmolLM2 is GPT-2-style byte-level BPE: every piece is whole bytes already, so the
    # detokenizer must not hold anything back for byte runs.
    assert smol.byte_token_ids == frozenset()


def test_encode_adds_nothing_and_keeps_spelled_special_tokens(smol: HFTokenizer) -> None:
    plain = smol.encode("Hello world")
    assert smol.decode(plain) == "Hello world"
    with_markers = smol.encode("<|im_start|>user\nHello world<|im_end|>")
    assert with_markers[0] == smol.encode("<|im_start|>")[0]
    assert with_markers[-1] == smol.encode("<|im_end|>")[0]
    assert smol.decode(with_markers) == "user\nHello world"  # special tokens skipped


@pytest.mark.model
def test_ids_become_the_token_strings_ctranslate2_expects(
    smol: HFTokenizer, test_model_dir: Path
) -> None:
    reference = Tokenizer.from_file(str(test_model_dir / "tokenizer.json"))
    text = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
    encoding = reference.encode(text, add_special_tokens=False)
    assert smol.convert_ids_to_tokens(encoding.ids) == encoding.tokens


@pytest.mark.model
def test_an_id_outside_the_vocabulary_is_refused(smol: HFTokenizer) -> None:
    with pytest.raises(ValueError, match="token id 10000000 is outside the vocabulary"):
        smol.convert_ids_to_tokens([1, 10_000_000])


# -- metadata sources, on a tiny tokenizer -------------------------------------------------


def test_template_comes_from_the_jinja_file_first(tiny_dir: Path) -> None:
    (tiny_dir / "chat_template.jinja").write_text("FROM FILE", encoding="utf-8")
    write_json(tiny_dir / "tokenizer_config.json", {"chat_template": "FROM CONFIG"})
    assert HFTokenizer.from_directory(tiny_dir).chat_template == "FROM FILE"


def test_template_comes_from_tokenizer_config_without_the_file(tiny_dir: Path) -> None:
    write_json(tiny_dir / "tokenizer_config.json", {"chat_template": "FROM CONFIG"})
    assert HFTokenizer.from_directory(tiny_dir).chat_template == "FROM CONFIG"


def test_the_default_one_of_several_named_templates_is_used(tiny_dir: Path) -> None:
    templates = [
        {"name": "tool_use", "template": "TOOLS"},
        {"name": "default", "template": "DEFAULT"},
    ]
    write_json(tiny_dir / "tokenizer_config.json", {"chat_template": templates})
    assert HFTokenizer.from_directory(tiny_dir).chat_template == "DEFAULT"


def test_a_model_without_a_template_says_so(tiny_dir: Path) -> None:
    tokenizer = HFTokenizer.from_directory(tiny_dir)
    assert tokenizer.chat_template is None
    assert tokenizer.special_tokens == {}


def test_special_tokens_in_both_config_spellings(tiny_dir: Path) -> None:
    write_json(
        tiny_dir / "tokenizer_config.json",
        {
            "bos_token": {"content": "<s>", "lstrip": False},
            "eos_token": "</s>",
            "unk_token": "[UNK]",
            "pad_token": None,
            "model_max_length": 4096,
        },
    )
    assert HFTokenizer.from_directory(tiny_dir).special_tokens == {
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "[UNK]",
    }


def test_end_tokens_join_generation_config_tokenizer_eos_and_end_of_turn(
    tiny_dir: Path,
) -> None:
    write_json(tiny_dir / "tokenizer_config.json", {"eos_token": "</s>"})
    write_json(tiny_dir / "generation_config.json", {"eos_token_id": [5, 1]})
    tokenizer = HFTokenizer.from_directory(tiny_dir)
    # 5 and 1 from generation_config, 4 the tokenizer's eos, 3 the vocabulary's <|eot_id|>.
    assert tokenizer.end_token_ids == frozenset({1, 3, 4, 5})


def test_a_single_generation_eos_id_is_accepted(tiny_dir: Path) -> None:
    write_json(tiny_dir / "generation_config.json", {"eos_token_id": 2})
    assert HFTokenizer.from_directory(tiny_dir).end_token_ids == frozenset({2, 3})


def test_decode_skips_special_tokens_and_encode_adds_none(tiny_dir: Path) -> None:
    tokenizer = HFTokenizer.from_directory(tiny_dir)
    assert tokenizer.encode("<s> hello world </s>") == [5, 1, 2, 4]
    assert tokenizer.decode([5, 1, 2, 4]) == "hello world"


def test_a_missing_tokenizer_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(TokenizerLoadError, match=r"tokenizer\.json is missing"):
        HFTokenizer.from_directory(tmp_path)


def test_a_broken_config_file_is_named(tiny_dir: Path) -> None:
    (tiny_dir / "tokenizer_config.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(TokenizerLoadError, match=r"tokenizer_config\.json cannot be read"):
        HFTokenizer.from_directory(tiny_dir)


# -- whether a plain prompt starts with the BOS ------------------------------------------------


def test_add_bos_token_in_the_config_decides_the_plain_prompt_bos(tiny_dir: Path) -> None:
    write_json(tiny_dir / "tokenizer_config.json", {"bos_token": "<s>", "add_bos_token": True})
    assert HFTokenizer.from_directory(tiny_dir).plain_prompt_bos_id == TINY_VOCAB["<s>"]
    write_json(tiny_dir / "tokenizer_config.json", {"bos_token": "<s>", "add_bos_token": False})
    assert HFTokenizer.from_directory(tiny_dir).plain_prompt_bos_id is None


def test_without_the_flag_the_post_processor_decides(tiny_dir: Path) -> None:
    from tokenizers.processors import TemplateProcessing

    write_json(tiny_dir / "tokenizer_config.json", {"bos_token": "<s>"})
    assert HFTokenizer.from_directory(tiny_dir).plain_prompt_bos_id is None  # adds nothing

    # Llama 3's shape: the BOS only in tokenizer.json's post-processor.
    tokenizer = Tokenizer.from_file(str(tiny_dir / "tokenizer.json"))
    tokenizer.post_processor = TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", TINY_VOCAB["<s>"])]
    )
    tokenizer.save(str(tiny_dir / "tokenizer.json"))
    loaded = HFTokenizer.from_directory(tiny_dir)
    assert loaded.plain_prompt_bos_id == TINY_VOCAB["<s>"]
    assert loaded.encode("hello") == [TINY_VOCAB["hello"]]  # encode itself adds nothing


@pytest.mark.model
def test_smollm2_plain_prompts_get_no_bos(smol: HFTokenizer) -> None:
    # Its GGUF: tokenizer.ggml.add_bos_token = false.
    assert smol.plain_prompt_bos_id is None
