"""The llama_cpp backend's numerics check: the failure policy (any measurement), and the
probe on the real SmolLM2 GGUF against the reference recorded for it."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from llm_local.backends.base import NumericsRejected
from llm_local.backends.llama_cpp.canary import (
    CHECK_OFF,
    NO_ADAPTER_REFERENCE,
    NO_REFERENCE,
    Probe,
    numerics_status,
)
from llm_local.backends.llama_cpp.loader import LoadedModel, load_model, plan_from_settings
from llm_local.core.numerics import Anchor, Measurement, ProbeItem, Reference
from llm_local.settings.loader import load_settings
from llm_local.settings.schema import AppSettings, NumericsSettings

REFERENCE = Reference(
    probe_version=2,
    max_new_tokens=4,
    items=(ProbeItem((1, 2, 3), (4, 5)),),
    nll=1.0,
    anchor=Anchor(nll=1.0, agreement=1.0),
)


def numerics(**changes: object) -> NumericsSettings:
    return dataclasses.replace(
        load_settings(env="test").numerics, **{"check_at_load": True, **changes}
    )


def measured(nll: float, agreement: float) -> Measurement:
    return Measurement("q4_1", "q4_1", nll, agreement, 0, 0.0, 0.0, 0.0)


def never_called(reference: Reference) -> Measurement:
    raise AssertionError("the probe ran")


def test_a_faithful_measurement_serves_verified_with_its_ratios() -> None:
    status = numerics_status("q4_1", numerics(), REFERENCE, lambda _: measured(1.02, 0.9))

    assert status is not None
    assert status.verified is True
    assert status.nll_ratio == pytest.approx(1.02)
    assert status.agreement_ratio == pytest.approx(0.9)
    assert (status.compute_type, status.chosen_by, status.warning) == ("q4_1", "settings", None)


def test_an_unfaithful_measurement_refuses_the_load_for_good_naming_the_bound() -> None:
    with pytest.raises(NumericsRejected) as refused:
        numerics_status("q4_1", numerics(), REFERENCE, lambda _: measured(4.0, 0.9))

    assert refused.value.retryable is False
    assert "does not compute q4_1 faithfully" in str(refused.value)
    assert "numerics.max_nll_ratio" in str(refused.value)


def test_accepting_unverified_numerics_serves_an_unfaithful_measurement_with_the_reason() -> None:
    status = numerics_status(
        "q4_1", numerics(accept_unverified=True), REFERENCE, lambda _: measured(1.0, 0.1)
    )

    assert status is not None and status.verified is False
    assert status.warning is not None and "numerics.min_agreement_ratio" in status.warning


def test_without_a_reference_or_with_the_check_off_it_serves_unverified_saying_why() -> None:
    missing = numerics_status("q4_1", numerics(), None, never_called)
    off = numerics_status("q4_1", numerics(check_at_load=False), REFERENCE, never_called)

    assert missing is not None and off is not None
    assert (missing.verified, missing.warning) == (False, NO_REFERENCE)
    assert (off.verified, off.warning) == (False, CHECK_OFF)
    assert numerics_status("q4_1", None, REFERENCE, never_called) is None


def test_an_adapter_failing_the_check_refuses_the_load_naming_it_unless_accepted() -> None:
    faithful = numerics_status(
        "q4_1", numerics(), REFERENCE, lambda _: measured(1.01, 1.0), adapter="pirate"
    )
    with pytest.raises(NumericsRejected) as refused:
        numerics_status(
            "q4_1", numerics(), REFERENCE, lambda _: measured(4.0, 0.9), adapter="pirate"
        )
    accepted = numerics_status(
        "q4_1",
        numerics(accept_unverified=True),
        REFERENCE,
        lambda _: measured(4.0, 0.9),
        adapter="pirate",
    )

    assert faithful is not None and faithful.verified is True
    assert refused.value.retryable is False
    assert "q4_1 + LoRA adapter 'pirate' faithfully" in str(refused.value)
    assert "base + adapter" in str(refused.value)
    assert accepted is not None and accepted.verified is False
    assert accepted.warning is not None and "numerics.max_nll_ratio" in accepted.warning


def test_an_adapter_without_a_reference_serves_unverified_saying_which() -> None:
    missing = numerics_status("q4_1", numerics(), None, never_called, adapter="robot")

    assert missing is not None and missing.verified is False
    assert missing.warning == NO_ADAPTER_REFERENCE.format("robot")
    assert "'robot'" in missing.warning


# -- on the real GGUF ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checked_settings(
    link_test_model: Callable[[Path], Path], tmp_path_factory: pytest.TempPathFactory
) -> AppSettings:
    """The test settings on llama_cpp with the check on, in a model cache of its own that
    holds the test model's ct2 entry (make test converts it): its unquantized answers are
    what the GGUF's reference takes (convert/gguf_reference.py)."""
    cache_dir = tmp_path_factory.mktemp("llama-cpp-numerics")
    link_test_model(cache_dir)
    loaded = load_settings(env="test")
    return dataclasses.replace(
        loaded,
        backend="llama_cpp",
        model=dataclasses.replace(loaded.model, cache_dir=cache_dir),
        numerics=dataclasses.replace(loaded.numerics, check_at_load=True),
    )


@pytest.fixture(scope="module")
def gguf_reference(checked_settings: AppSettings) -> Reference:
    from llm_local.convert.gguf_reference import ensure_gguf_reference, find_gguf_reference

    settings = checked_settings
    _, recorded = ensure_gguf_reference(settings, lambda _: None)
    assert recorded
    reference = find_gguf_reference(settings)
    assert reference is not None
    return reference


@pytest.fixture(scope="module")
def loaded(checked_settings: AppSettings, gguf_reference: Reference) -> Iterator[LoadedModel]:
    """The GGUF loaded with the check at load on: it ran before this fixture returns."""
    plan = plan_from_settings(checked_settings)
    assert plan.reference == gguf_reference
    model = load_model(plan)
    yield model
    model.handle.free()


def probe(model: LoadedModel) -> Probe:
    handle = model.handle
    return Probe(
        handle.lib,
        handle.ctx,
        handle.memory,
        vocab_size=model.tokenizer.vocab_size,
        end_token_ids=model.tokenizer.end_token_ids,
        batch_tokens=handle.context_options.batch_tokens,
        sequences=handle.context_options.sequences,
        kv_cache_tokens=handle.context_options.kv_cache_tokens,
        compute_type=model.info.compute_type,
    )


@pytest.mark.model
def test_the_check_runs_at_load_and_the_gguf_computes_faithfully(loaded: LoadedModel) -> None:
    status = loaded.info.numerics

    assert status is not None
    assert status.verified is True, status.warning
    assert status.compute_type == "q4_1"
    assert status.nll_ratio is not None and status.nll_ratio <= 1.25
    assert status.agreement_ratio is not None and status.agreement_ratio >= 0.6


@pytest.mark.model
def test_the_probe_sees_answers_the_model_would_not_give(
    loaded: LoadedModel, gguf_reference: Reference
) -> None:
    # Each prompt paired with another prompt's answer: what a broken kernel looks like
    # to the judgement (the model finds these answers unlikely and does not produce them).
    items = gguf_reference.items[:2]
    swapped = tuple(
        ProbeItem(item.prompt_ids, items[(index + 1) % len(items)].answer_ids)
        for index, item in enumerate(items)
    )
    wrong = dataclasses.replace(gguf_reference, items=swapped)

    measurement = probe(loaded).measure(wrong)

    assert measurement.nll > 1.25 * gguf_reference.nll
    assert measurement.equal_answers == 0
    with pytest.raises(NumericsRejected):
        numerics_status("q4_1", numerics(), wrong, lambda _: measurement)


@pytest.mark.model
def test_a_small_kv_cache_pool_runs_the_probe_a_few_sequences_at_a_time(
    loaded: LoadedModel, gguf_reference: Reference
) -> None:
    small = dataclasses.replace(gguf_reference, items=gguf_reference.items[:3])
    roomy = probe(loaded).measure(small)
    handle = loaded.handle
    # Room for one item at a time: the probe must not ask the pool for more.
    tight = Probe(
        handle.lib,
        handle.ctx,
        handle.memory,
        vocab_size=loaded.tokenizer.vocab_size,
        end_token_ids=loaded.tokenizer.end_token_ids,
        batch_tokens=handle.context_options.batch_tokens,
        sequences=handle.context_options.sequences,
        kv_cache_tokens=64,
        compute_type="q4_1",
    ).measure(small)

    # Teacher-forced scores do not depend on how many items run at once. (Greedy answers
    # may: a batch of another size may round a near-tie the other way.)
    assert tight.nll == pytest.approx(roomy.nll, rel=1e-3)


@pytest.mark.model
def test_the_check_at_load_leaves_every_sequence_empty_for_the_scheduler(
    loaded: LoadedModel,
) -> None:
    handle = loaded.handle
    lib = handle.lib

    for seq in range(handle.context_options.sequences):
        assert lib.llama_memory_seq_pos_max(handle.memory, seq) == -1
