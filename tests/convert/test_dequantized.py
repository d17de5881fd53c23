"""A GGUF's dequantized copy kept in the model cache: made once, read back bit for bit,
found only for the same file, never half written, and never in the way of a load.

One real dequantization of the SmolLM2 GGUF serves the module (about 15 s here)."""

from __future__ import annotations

import dataclasses
import errno
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from llm_local.convert import dequantized
from llm_local.convert.cache import MANIFEST_NAME
from llm_local.convert.command import main
from llm_local.convert.dequantized import (
    WEIGHTS_FILE,
    dequantized_dir,
    find_dequantized,
    keep_dequantized,
)
from llm_local.convert.sources import ModelSource, resolve_source
from llm_local.convert.unquantized import load_unquantized
from llm_local.settings.loader import load_settings
from llm_local.settings.schema import ModelSettings

pytestmark = pytest.mark.model


def gguf_source(fingerprint: str) -> ModelSource:
    path = Path("/models/m.gguf")
    return ModelSource(str(path), "gguf", str(path), "m.gguf", path, None, fingerprint)


def model_settings(cache_dir: Path) -> ModelSettings:
    return dataclasses.replace(load_settings(env="test").model, cache_dir=cache_dir)


@dataclass(frozen=True)
class TwoLoads:
    cache_dir: Path
    source: ModelSource
    dequantized: Any  # the model dequantized from the file, with keeping on
    read_back: Any  # the next load's model
    first_reports: list[str]
    second_reports: list[str]


@pytest.fixture(scope="module")
def two_loads(tmp_path_factory: pytest.TempPathFactory) -> TwoLoads:
    cache_dir = tmp_path_factory.mktemp("model-cache")
    model = model_settings(cache_dir)
    source = resolve_source(model)
    first: list[str] = []
    second: list[str] = []
    dequantized_now, _ = load_unquantized(
        source, model, tmp_path_factory.mktemp("work"), first.append, keep_dequantized=True
    )
    read_back, _ = load_unquantized(source, model, tmp_path_factory.mktemp("work"), second.append)
    return TwoLoads(cache_dir, source, dequantized_now, read_back, first, second)


def test_the_next_load_reads_the_kept_copy_bit_for_bit(two_loads: TwoLoads) -> None:
    kept = find_dequantized(two_loads.cache_dir, two_loads.source)

    assert kept is not None
    assert any(line.startswith("dequantizing") for line in two_loads.first_reports)
    assert any(str(kept) in line for line in two_loads.first_reports)
    assert not any(line.startswith("dequantizing") for line in two_loads.second_reports)
    assert any("reading the dequantized copy" in line for line in two_loads.second_reports)
    expected = two_loads.dequantized.state_dict()
    actual = two_loads.read_back.state_dict()
    assert sorted(actual) == sorted(expected)
    for name, tensor in expected.items():
        assert actual[name].dtype == tensor.dtype, name
        assert bool((actual[name] == tensor).all()), name


def test_the_kept_copy_carries_the_tokenizer_and_nothing_is_left_behind(
    two_loads: TwoLoads,
) -> None:
    kept = find_dequantized(two_loads.cache_dir, two_loads.source)

    assert kept is not None
    assert {"tokenizer.json", "tokenizer_config.json", "config.json", WEIGHTS_FILE} <= {
        path.name for path in kept.iterdir()
    }
    assert list(two_loads.cache_dir.glob(".tmp-*")) == []


def test_the_convert_command_finds_the_copy_for_the_transformers_backend(
    two_loads: TwoLoads, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("LLM_LOCAL_SERVICE_BACKEND", "transformers")

    code = main(["--env", "test", "--cache-dir", str(two_loads.cache_dir)])

    assert code == 0
    kept = find_dequantized(two_loads.cache_dir, two_loads.source)
    assert f"the dequantized copy of {two_loads.source.spec} is already at {kept}" in (
        capsys.readouterr().out
    )


def test_a_changed_file_is_not_read_from_the_copy_of_the_old_one(tmp_path: Path) -> None:
    old, changed = gguf_source("size=1,mtime=1"), gguf_source("size=1,mtime=2")
    directory = dequantized_dir(tmp_path, old)
    directory.mkdir(parents=True)
    (directory / WEIGHTS_FILE).write_bytes(b"weights")
    manifest = {"inputs": dequantized.dequantized_inputs(old)}
    (directory / MANIFEST_NAME).write_text(json.dumps(manifest))

    assert find_dequantized(tmp_path, old) == directory
    assert dequantized_dir(tmp_path, changed) != directory
    assert find_dequantized(tmp_path, changed) is None


def test_a_copy_without_its_manifest_or_weights_is_not_found(tmp_path: Path) -> None:
    source = gguf_source("size=1,mtime=1")
    directory = dequantized_dir(tmp_path, source)
    directory.mkdir(parents=True)
    (directory / WEIGHTS_FILE).write_bytes(b"weights")  # killed before its manifest

    assert find_dequantized(tmp_path, source) is None

    (directory / MANIFEST_NAME).write_text(
        json.dumps({"inputs": dequantized.dequantized_inputs(source)})
    )
    (directory / WEIGHTS_FILE).unlink()

    assert find_dequantized(tmp_path, source) is None


class FullDisk:
    """A model whose weights do not fit the disk."""

    def save_pretrained(self, directory: Path, **_: object) -> None:
        Path(directory).mkdir(parents=True)
        (Path(directory) / WEIGHTS_FILE).write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_leaves_no_copy_and_no_scratch(tmp_path: Path) -> None:
    source = gguf_source("size=1,mtime=1")
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()

    with pytest.raises(OSError, match="No space left"):
        keep_dequantized(FullDisk(), hf_dir, tmp_path / "cache", source)

    assert find_dequantized(tmp_path / "cache", source) is None
    assert list((tmp_path / "cache").glob(".tmp-*")) == []


def test_a_load_that_cannot_keep_its_copy_still_loads_and_says_why(
    two_loads: TwoLoads, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full_disk(*_: object, **__: object) -> Path:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(dequantized, "keep_dequantized", full_disk)
    monkeypatch.setattr(dequantized, "find_dequantized", lambda *_: None)
    monkeypatch.setattr(
        "llm_local.convert.gguf.load_gguf",
        lambda path, hf_dir: _tokenizer_only(two_loads, hf_dir),
    )
    reports: list[str] = []

    loaded, _ = load_unquantized(
        two_loads.source,
        model_settings(tmp_path),
        tmp_path / "work",
        reports.append,
        keep_dequantized=True,
    )

    assert loaded is two_loads.read_back
    assert any("could not keep the dequantized copy" in line for line in reports)
    assert any("No space left on device" in line for line in reports)


def _tokenizer_only(two_loads: TwoLoads, hf_dir: Path) -> Any:
    """Stands in for a dequantization: the kept copy's files, the model already loaded."""
    kept = find_dequantized(two_loads.cache_dir, two_loads.source)
    assert kept is not None
    shutil.copytree(kept, hf_dir)
    return two_loads.read_back
