"""`llama_cpp.weights`: the rule (pure), and the copies and verdicts on the real SmolLM2 GGUF."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import get_args

import pytest

from llm_local.backends.base import NumericsRejected
from llm_local.backends.llama_cpp import loader, weights
from llm_local.backends.llama_cpp.backend import LlamaCppBackend
from llm_local.backends.llama_cpp.library import library
from llm_local.backends.llama_cpp.loader import plan_from_settings
from llm_local.backends.llama_cpp.weights import (
    AS_IS,
    AUTO,
    WEIGHT_CHOICES,
    StepCost,
    WeightsPlan,
    available_memory,
    candidates,
    choose,
    find_relaid,
    fits_memory,
    serving_weights,
)
from llm_local.core.types import GenerationRequest
from llm_local.settings.errors import SettingsError
from llm_local.settings.loader import load_settings
from llm_local.settings.schema import AppSettings, LlamaCppWeights
from tests.backends.generation import answer_text

FRANCE = "What is the capital of France? Answer in one sentence."


def test_auto_tries_the_q8_0_copy_unless_the_file_is_q8_0() -> None:
    assert candidates("q4_1") == ("q8_0",)
    assert candidates("q4_k") == ("q8_0",)
    assert candidates("bf16") == ("q8_0",)
    assert candidates("q8_0") == ()


def test_a_copy_serves_only_when_clearly_cheaper_than_the_file() -> None:
    file = StepCost(busy_s=1.0, lone_s=0.5)
    assert choose({AS_IS: file}) == AS_IS
    # Within a busy machine's noise:
    assert choose({AS_IS: file, "q8_0": StepCost(0.95, 0.5)}) == AS_IS
    assert choose({AS_IS: file, "q8_0": StepCost(0.8, 0.5), "bf16": StepCost(0.6, 0.5)}) == "bf16"
    assert choose({AS_IS: StepCost(0.5, 0.5), "q8_0": StepCost(0.8, 0.4)}) == AS_IS


def test_a_copy_that_slows_a_lone_stream_down_is_not_served_however_cheap_busy() -> None:
    file = StepCost(busy_s=7.0, lone_s=12.0)
    costs = {AS_IS: file, "q8_0": StepCost(4.0, 12.2), "bf16": StepCost(3.7, 14.5)}
    assert choose(costs) == "q8_0"
    assert choose({AS_IS: file, "bf16": StepCost(3.7, 14.5)}) == AS_IS


def test_a_candidate_too_large_for_the_memory_available_is_not_tried() -> None:
    parameters = 134_515_008  # SmolLM2-135M: 269 MB in bfloat16, 143 MB in Q8_0
    assert fits_memory(parameters, "bf16", 2 * 1024**3)
    # A quarter of 768 MiB: 192 MiB.
    assert not fits_memory(parameters, "bf16", 768 * 1024**2)
    assert fits_memory(parameters, "q8_0", 768 * 1024**2)
    assert fits_memory(parameters, "bf16", None)  # unknown: tried


def test_available_memory_is_read_from_meminfo(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       16000000 kB\nMemAvailable:    8000000 kB\n")
    assert available_memory(meminfo) == 8000000 * 1024
    assert available_memory(tmp_path / "absent") is None


def test_the_setting_takes_exactly_the_choices_the_backend_knows() -> None:
    assert set(get_args(LlamaCppWeights)) == set(WEIGHT_CHOICES)
    with pytest.raises(SettingsError, match=r"llama_cpp\.weights"):
        load_settings(env="test", overrides={"llama_cpp.weights": "q4_0"})


def _settings(cache_dir: Path, setting: str) -> AppSettings:
    loaded = load_settings(env="test")
    return dataclasses.replace(
        loaded,
        model=dataclasses.replace(loaded.model, cache_dir=cache_dir),
        llama_cpp=dataclasses.replace(loaded.llama_cpp, weights=setting, sequences=4),
    )


def _plan(settings: AppSettings) -> WeightsPlan:
    plan = plan_from_settings(settings)
    assert plan.source is not None
    return WeightsPlan(
        gguf=plan.gguf,
        source=plan.source,
        cache_dir=settings.model.cache_dir,
        setting=settings.llama_cpp.weights,
        threads=plan.threads,
        gpu_layers=0,
        repack=False,
    )


@pytest.mark.model
async def test_a_q8_0_copy_is_kept_in_the_cache_and_serves_the_same_answer(
    tmp_path: Path,
) -> None:
    settings = _settings(tmp_path, "q8_0")
    backend = LlamaCppBackend(lambda: plan_from_settings(settings))
    await backend.load()
    try:
        assert backend.info.compute_type == "q8_0"
        text, _ = await answer_text(backend, GenerationRequest(user_prompt=FRANCE))
    finally:
        await backend.aclose()
    assert "Paris" in text
    kept = find_relaid(tmp_path, _plan(settings).source, "q8_0")
    assert kept is not None and kept.stat().st_size > 0
    written = kept.stat().st_mtime_ns

    # The next start reads the copy instead of writing it again.
    assert serving_weights(library(), _plan(settings)) == kept
    assert kept.stat().st_mtime_ns == written


@pytest.mark.model
def test_auto_measures_once_serves_the_cheapest_and_keeps_the_verdict(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plan = _plan(_settings(tmp_path, AUTO))

    served = serving_weights(library(), plan)

    [verdict_file] = (tmp_path / plan.source.slug / weights.VERDICT_DIR).glob("*.json")
    verdict = json.loads(verdict_file.read_text())
    costs = {kind: StepCost(**cost) for kind, cost in verdict["costs"].items()}
    assert verdict["stored_type"] == "q4_1"
    assert set(costs) == {AS_IS, "q8_0"}
    assert all(cost.busy_s > 0 and cost.lone_s > 0 for cost in costs.values())
    assert verdict["chosen"] == choose(costs)
    expected = (
        plan.gguf
        if verdict["chosen"] == AS_IS
        else find_relaid(tmp_path, plan.source, verdict["chosen"])
    )
    assert served == expected

    def no_measuring(*args: object) -> tuple[StepCost, str, int]:
        raise AssertionError("measured again despite the kept verdict")

    monkeypatch.setattr(weights, "step_cost", no_measuring)
    assert serving_weights(library(), plan) == served


def test_as_is_and_auto_on_a_gpu_serve_the_file_without_touching_the_cache(
    tmp_path: Path,
) -> None:
    plan = _plan(_settings(tmp_path, AS_IS))
    assert serving_weights(library(), plan) == plan.gguf
    on_gpu = dataclasses.replace(plan, setting=AUTO, gpu_layers=99)
    assert serving_weights(library(), on_gpu) == plan.gguf
    assert not (tmp_path / plan.source.slug).exists()


@pytest.mark.model
def test_auto_serves_the_file_when_the_cache_cannot_take_a_copy(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A cache under a regular file: nothing can be written there, even by root (as a
    # read-only volume refuses a server that lacks the copies).
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    plan = _plan(_settings(blocker / "cache", AUTO))

    with caplog.at_level("WARNING", logger="llm_local.backends.llama_cpp"):
        assert serving_weights(library(), plan) == plan.gguf

    assert "not tried" in caplog.text
    assert "cannot keep the weights verdict" in caplog.text


@pytest.mark.model
@pytest.mark.parametrize(("setting", "serves"), [(AUTO, "q4_1"), ("q8_0", None)])
def test_a_copy_that_fails_the_numerics_check_gives_way_to_the_file_only_under_auto(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    setting: str,
    serves: str | None,
) -> None:
    settings = _settings(tmp_path, setting)
    plan = plan_from_settings(settings)
    copy = weights.ensure_relaid(library(), _plan(settings), "q8_0")
    monkeypatch.setattr(loader, "served_file", lambda lib, plan: copy)

    def judged(compute_type: str, *args: object, **kwargs: object) -> None:
        if compute_type == "q8_0":
            raise NumericsRejected("q8_0: NLL ratio 1.4 (bound 1.25)")
        return None

    monkeypatch.setattr(loader, "numerics_status", judged)
    if serves is None:
        with pytest.raises(NumericsRejected):
            loader.load_model(plan)
        return
    with caplog.at_level("WARNING", logger="llm_local.backends.llama_cpp"):
        loaded = loader.load_model(plan)
    try:
        assert loaded.info.compute_type == serves
    finally:
        loaded.handle.free()
    assert "the re-laid copy failed the numerics check" in caplog.text
