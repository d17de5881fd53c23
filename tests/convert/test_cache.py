"""The cache's rules: what counts as complete, atomic install, stale scratch, the lock."""

from __future__ import annotations

import json
from pathlib import Path

from llm_local.convert import cache
from llm_local.convert.sources import ModelSource

SOURCE = ModelSource(
    spec="org/model",
    kind="hub",
    identity="org/model",
    slug="org--model",
    path=None,
    revision=None,
    fingerprint="revision=default",
)


def complete_model(directory: Path, key: str) -> Path:
    directory.mkdir(parents=True)
    (directory / "model.bin").write_bytes(b"weights")
    cache.write_manifest(directory, {"key": key})
    return directory


def test_key_changes_with_every_input() -> None:
    base = cache.conversion_inputs(SOURCE, "int8")
    keys = {cache.inputs_key(base)}
    for field, value in [
        ("quantization", "float16"),
        ("source", "org/other"),
        ("revision", "v2"),
        ("fingerprint", "revision=v2"),
        ("ctranslate2_major", "99"),
    ]:
        keys.add(cache.inputs_key({**base, field: value}))
    assert len(keys) == 6
    assert cache.inputs_key(dict(reversed(list(base.items())))) == cache.inputs_key(base)


def test_model_dir_names_source_and_quantization(tmp_path: Path) -> None:
    assert cache.model_dir_for(tmp_path, SOURCE, "int8", "abc") == tmp_path / "org--model/int8-abc"


def test_complete_needs_the_manifest_with_its_key_and_the_model(tmp_path: Path) -> None:
    directory = complete_model(tmp_path / "m", "k1")
    assert cache.read_complete(directory, "k1") == {"key": "k1"}
    assert cache.read_complete(directory, "k2") is None
    (directory / "model.bin").unlink()
    assert cache.read_complete(directory, "k1") is None


def test_partial_directory_without_manifest_is_not_complete(tmp_path: Path) -> None:
    directory = tmp_path / "m"
    directory.mkdir()
    (directory / "model.bin").write_bytes(b"half")
    (directory / "manifest.json.partial").write_text(json.dumps({"key": "k"}))
    assert cache.read_complete(directory, "k") is None


def test_install_replaces_the_previous_model_in_one_step(tmp_path: Path) -> None:
    target = complete_model(tmp_path / "cache/org--model/int8-k", "old")
    work = cache.new_work_dir(tmp_path / "cache")
    built = complete_model(work / "model", "new")
    cache.install(built, target, work)
    assert cache.read_complete(target, "new") is not None
    assert not built.exists()
    assert cache.read_complete(work / "previous", "old") is not None  # deleted with `work`


def test_stale_scratch_directories_are_removed(tmp_path: Path) -> None:
    stale = cache.new_work_dir(tmp_path)
    (stale / "hf").mkdir()
    keep = complete_model(tmp_path / "org--model/int8-k", "k")
    assert cache.remove_stale_tmp(tmp_path) == [stale]
    assert not stale.exists()
    assert keep.exists()


def test_lock_is_exclusive_between_holders(tmp_path: Path) -> None:
    with cache.conversion_lock(tmp_path) as held:
        assert held
        with cache.conversion_lock(tmp_path, blocking=False) as second:
            assert second is False
    with cache.conversion_lock(tmp_path, blocking=False) as after:
        assert after is True
