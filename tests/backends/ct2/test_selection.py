"""The load path's numerics: the check at load, explicit types refused or accepted
unverified, auto's fallback and its cached verdict, on the real SmolLM2 model.

Each test loads from a scratch directory of links to the test model, so the verdicts
it writes stay there. Verdicts here are written by the test (a test double of the
measuring step); the measuring itself runs for real in tests/e2e/test_numerics.py.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import pytest

from llm_local.backends.base import NumericsRejected
from llm_local.backends.ct2 import autotune, selection
from llm_local.backends.ct2.loader import LoadedModel, load_model
from llm_local.backends.shared.threads import usable_cpus
from llm_local.convert.reference import REFERENCE_FILE, read_reference
from llm_local.core.numerics import Measurement
from llm_local.settings.schema import NumericsSettings

from .conftest import plan

pytestmark = pytest.mark.model

CHECKED = NumericsSettings(
    max_nll_ratio=1.25,
    min_agreement_ratio=0.6,
    accept_unverified=False,
    check_at_load=True,
    verdict_dir=None,
)


@pytest.fixture
def model_dir(link_test_model: Callable[[Path], Path], tmp_path: Path) -> Path:
    """The test model's files, linked into a directory of this test's own."""
    return link_test_model(tmp_path / "cache")


def load(model_dir: Path, compute_type: str, numerics: NumericsSettings = CHECKED) -> LoadedModel:
    return load_model(dataclasses.replace(plan(model_dir, compute_type), numerics=numerics))


def unload(model: LoadedModel) -> None:
    model.generator.unload_model()


def fake_measurement(compute_type: str, *, agreement: float, batch: float) -> Measurement:
    return Measurement(
        compute_type=compute_type,
        effective_type=compute_type,
        nll=0.7,
        agreement=agreement,
        equal_answers=0,
        batch_tokens_per_s=batch,
        single_tokens_per_s=batch / 4,
        load_seconds=0.1,
    )


def write_fake_verdict(
    model_dir: Path, *measurements: Measurement, verdict_dir: Path | None = None
) -> None:
    identity = autotune.machine_identity("cpu", 0)
    verdict = autotune.Verdict(
        key=autotune.verdict_key(identity),
        identity=identity,
        measurements=measurements,
        cpus=2,
        single_speed_by_threads={1: 20.0, 2: 18.0},
    )
    assert autotune.write_verdict(model_dir, verdict, verdict_dir)


@pytest.fixture
def no_measuring(monkeypatch: pytest.MonkeyPatch) -> None:
    def measuring_is_not_expected(*args: object, **kwargs: object) -> None:
        raise AssertionError("measured although a verdict for this machine is cached")

    monkeypatch.setattr(autotune, "new_verdict", measuring_is_not_expected)


def test_float32_passes_the_check_at_load(model_dir: Path) -> None:
    reference = read_reference(model_dir)
    assert reference is not None
    model = load(model_dir, "float32")
    try:
        status = model.info.numerics
        assert status is not None
        assert status.verified
        assert status.chosen_by == "settings"
        assert status.warning is None
        # The same computation as the anchor recorded at conversion.
        assert status.nll_ratio == pytest.approx(reference.anchor.nll / reference.nll, rel=1e-3)
        assert status.agreement_ratio is not None and status.agreement_ratio > 0.9
    finally:
        unload(model)


def test_an_explicit_type_that_fails_is_refused_with_the_reason(model_dir: Path) -> None:
    # A bound set below what int8 measures on any CPU (its rounding costs likelihood):
    # unfaithful on purpose.
    strict = dataclasses.replace(CHECKED, max_nll_ratio=1.0)
    with pytest.raises(NumericsRejected) as refused:
        load(model_dir, "int8", strict)
    message = str(refused.value)
    assert "compute_type int8 is not faithful on this machine" in message
    assert "above the bound 1 (numerics.max_nll_ratio)" in message
    assert "numerics.accept_unverified" in message
    assert not refused.value.retryable


def test_accepting_unverified_numerics_serves_with_a_warning(model_dir: Path) -> None:
    lenient = dataclasses.replace(CHECKED, max_nll_ratio=1.0, accept_unverified=True)
    model = load(model_dir, "int8", lenient)
    try:
        status = model.info.numerics
        assert status is not None
        assert not status.verified
        assert status.warning is not None and "numerics.max_nll_ratio" in status.warning
    finally:
        unload(model)


def test_auto_serves_the_next_candidate_when_the_fastest_is_unfaithful(
    model_dir: Path, no_measuring: None
) -> None:
    reference = read_reference(model_dir)
    assert reference is not None
    anchor = reference.anchor.agreement
    write_fake_verdict(
        model_dir,
        fake_measurement("int8", agreement=0.1 * anchor, batch=300),  # flips answers
        fake_measurement("float32", agreement=anchor, batch=100),
    )
    # The verdict alone decides here (the check at load has a test of its own below).
    model = load(model_dir, "auto", dataclasses.replace(CHECKED, check_at_load=False))
    try:
        status = model.info.numerics
        assert status is not None
        assert (status.compute_type, status.verified, status.chosen_by) == ("float32", True, "auto")
        assert model.info.threads == (2, 1)  # explicit numbers win over the verdict's
    finally:
        unload(model)


def test_auto_moves_on_when_a_candidate_fails_the_check_at_load(
    model_dir: Path, no_measuring: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    reference = read_reference(model_dir)
    assert reference is not None
    anchor = reference.anchor.agreement
    write_fake_verdict(
        model_dir,
        fake_measurement("int8", agreement=anchor, batch=300),  # passed when measured...
        fake_measurement("float32", agreement=anchor, batch=100),
    )
    real_measure = selection.measure

    def scores_perturbed_for_int8(*args: object, **kwargs: object) -> Measurement:
        measured = real_measure(*args, **kwargs)  # type: ignore[arg-type]
        if kwargs["compute_type"] == "int8":  # ...but computes nonsense now
            return dataclasses.replace(measured, nll=measured.nll * 10)
        return measured

    monkeypatch.setattr(selection, "measure", scores_perturbed_for_int8)
    model = load(model_dir, "auto")
    try:
        assert model.info.numerics is not None
        assert model.info.numerics.compute_type == "float32"
    finally:
        unload(model)


def test_auto_refuses_when_no_candidate_is_faithful(model_dir: Path, no_measuring: None) -> None:
    write_fake_verdict(model_dir, fake_measurement("int8", agreement=0.0, batch=300))
    with pytest.raises(NumericsRejected, match="no candidate computes faithfully here: int8: "):
        load(model_dir, "auto")


def test_auto_takes_threads_from_the_verdict(model_dir: Path, no_measuring: None) -> None:
    reference = read_reference(model_dir)
    assert reference is not None
    write_fake_verdict(
        model_dir, fake_measurement("float32", agreement=reference.anchor.agreement, batch=50)
    )
    # Without the check at load: the cached verdict vouches for the candidate.
    trusting = dataclasses.replace(CHECKED, check_at_load=False)
    auto_threads = dataclasses.replace(
        plan(model_dir, "auto"), inter_threads="auto", intra_threads="auto", numerics=trusting
    )
    model = load_model(auto_threads)
    try:
        # The fake verdict: 2 CPUs, one thread faster than two for one stream.
        assert model.info.threads == (2, 1)
        assert model.generator.num_generators == 2
        status = model.info.numerics
        assert status is not None
        assert (status.compute_type, status.verified, status.chosen_by) == ("float32", True, "auto")
    finally:
        unload(model)


def test_without_a_reference_auto_serves_the_old_default_unverified(model_dir: Path) -> None:
    (model_dir / REFERENCE_FILE).unlink()
    model = load(model_dir, "auto")
    try:
        status = model.info.numerics
        assert status is not None
        assert (status.compute_type, status.verified) == ("int8_float32", False)
        assert status.warning is not None and "llm-local convert" in status.warning
    finally:
        unload(model)


def test_a_read_only_model_cache_keeps_its_verdict_in_the_verdict_dir(
    model_dir: Path, tmp_path: Path, no_measuring: None
) -> None:
    reference = read_reference(model_dir)
    assert reference is not None
    verdicts = tmp_path / "verdicts"
    write_fake_verdict(
        model_dir,
        fake_measurement("float32", agreement=reference.anchor.agreement, batch=50),
        verdict_dir=verdicts,
    )
    assert not (model_dir / autotune.VERDICT_DIR).exists()
    trusting = dataclasses.replace(CHECKED, verdict_dir=verdicts, check_at_load=False)
    model = load(model_dir, "auto", trusting)
    try:
        assert model.info.numerics is not None
        assert model.info.numerics.chosen_by == "auto"
    finally:
        unload(model)


def test_an_explicit_type_with_auto_threads_measures_nothing(
    model_dir: Path, no_measuring: None
) -> None:
    unchecked = dataclasses.replace(CHECKED, check_at_load=False)
    explicit = dataclasses.replace(
        plan(model_dir, "float32"), inter_threads="auto", intra_threads="auto", numerics=unchecked
    )
    model = load_model(explicit)
    try:
        # No verdict cached: every usable CPU is a worker of one thread.
        assert model.info.threads == (usable_cpus(), 1)
    finally:
        unload(model)
