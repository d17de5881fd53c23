"""Pick the compute type and thread layout, load, and check the numerics: the load path.

- `compute_type = auto`: the cached verdict for this machine (or a new one, measured
  now: autotune.py) ranks the candidates; the fastest faithful one is loaded and checked
  again (the canary). Should the check fail now (say the process had already chosen
  its CPU kernels), the next faithful candidate is tried.
- An explicit compute type is loaded and checked; failing, the load is refused
  (NumericsRejected: the service stays "failed" with the reason) unless
  `numerics.accept_unverified`, which serves it with a warning.
- A model without a reference (`llm-local convert` adds one) cannot be checked: it
  serves unverified, "auto" meaning int8 on a CPU and float16 on CUDA as before.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import TYPE_CHECKING

from llm_local.backends.base import BackendLoadError, NumericsRejected
from llm_local.backends.ct2 import autotune
from llm_local.backends.ct2.canary import measure
from llm_local.backends.ct2.loader import LoadPlan, open_generator
from llm_local.backends.ct2.measure import KERNEL_ENV
from llm_local.backends.hf_tokenizer import HFTokenizer
from llm_local.backends.shared.threads import usable_cpus
from llm_local.convert.reference import read_reference
from llm_local.core.numerics import (
    Bounds,
    Measurement,
    NumericsStatus,
    Reference,
    choose,
    judge,
)
from llm_local.settings.device import AUTO_TYPE_BY_DEVICE

if TYPE_CHECKING:
    import ctranslate2

log = logging.getLogger("llm_local.backends.ct2")

NO_REFERENCE = "no numerics reference recorded for this model (run `llm-local convert`)"


def load_checked(
    plan: LoadPlan, tokenizer: HFTokenizer
) -> tuple[ctranslate2.Generator, NumericsStatus | None, tuple[int, int]]:
    settings = plan.numerics
    reference = read_reference(plan.model_dir) if settings is not None else None
    verdict = None
    if reference is not None and plan.compute_type == "auto":
        verdict = _verdict(plan, reference)
    elif reference is not None and "auto" in _threads(plan):
        # An explicit type measures nothing: auto threads use a verdict if one is cached.
        verdict = _cached_verdict(plan)
    layout = _layout(plan, verdict)
    if reference is None:
        # Nothing to judge by: "auto" means what it meant before references existed.
        unchecked = plan.compute_type
        if unchecked == "auto":
            unchecked = AUTO_TYPE_BY_DEVICE[plan.device]
        generator = open_generator(plan, unchecked, layout)
        if settings is None:  # no check asked for (tests, benches)
            return generator, None, layout
        log.warning("%s: serving %s unverified", NO_REFERENCE, unchecked)
        chosen_by = "auto" if plan.compute_type == "auto" else "settings"
        status = NumericsStatus(
            str(generator.compute_type), False, None, None, chosen_by, warning=NO_REFERENCE
        )
        return generator, status, layout
    assert settings is not None  # a reference is only read when a check is asked for
    bounds = Bounds(settings.max_nll_ratio, settings.min_agreement_ratio)
    if plan.compute_type == "auto":
        assert verdict is not None
        return _load_auto(plan, tokenizer, reference, verdict, bounds, layout)
    return _load_explicit(plan, tokenizer, reference, bounds, layout)


def _threads(plan: LoadPlan) -> tuple[object, object]:
    return plan.inter_threads, plan.intra_threads


def _layout(plan: LoadPlan, verdict: autotune.Verdict | None) -> tuple[int, int]:
    """Explicit numbers win; "auto" comes from the verdict, or from the CPU count."""
    if plan.device != "cpu":
        auto_inter, auto_intra = 1, 1  # one worker per GPU
    elif verdict is not None and verdict.single_speed_by_threads:
        auto_inter, auto_intra = verdict.layout()
    else:
        auto_inter, auto_intra = usable_cpus(), 1
    inter = auto_inter if plan.inter_threads == "auto" else int(plan.inter_threads)
    intra = auto_intra if plan.intra_threads == "auto" else int(plan.intra_threads)
    return inter, intra


def _cached_verdict(plan: LoadPlan) -> autotune.Verdict | None:
    assert plan.numerics is not None
    key = autotune.verdict_key(autotune.machine_identity(plan.device, plan.device_index))
    return autotune.read_verdict(plan.model_dir, key, plan.numerics.verdict_dir)


def _verdict(plan: LoadPlan, reference: Reference) -> autotune.Verdict:
    assert plan.numerics is not None
    bounds = Bounds(plan.numerics.max_nll_ratio, plan.numerics.min_agreement_ratio)
    cached = _cached_verdict(plan)
    if cached is not None:
        log.info("numerics verdict for this machine found (%s): not measuring again", cached.key)
        return cached
    log.info("measuring compute types on this machine (once; cached beside the model)")
    verdict = autotune.measure_verdict(
        plan.model_dir,
        plan.device,
        plan.device_index,
        reference,
        bounds,
        plan.numerics.verdict_dir,
    )
    log.info("measured %d compute types in %.1f s", len(verdict.measurements), verdict.seconds)
    return verdict


def _load_auto(
    plan: LoadPlan,
    tokenizer: HFTokenizer,
    reference: Reference,
    verdict: autotune.Verdict,
    bounds: Bounds,
    layout: tuple[int, int],
) -> tuple[ctranslate2.Generator, NumericsStatus, tuple[int, int]]:
    choice = choose(verdict.measurements, reference, bounds)
    for measurement, judgement in choice.ranked:
        log.info(
            "candidate %-28s %s: NLL ratio %.3f, agreement %.2f of float32's, %.0f tok/s batched",
            measurement.label,
            "passes" if judgement.passed else "fails",
            judgement.nll_ratio,
            judgement.agreement_ratio,
            measurement.batch_tokens_per_s,
        )
    faithful = [(m, judgement) for m, judgement in choice.ranked if judgement.passed]
    reasons = [j.reason for _, j in choice.ranked if j.reason]
    for candidate, judgement in faithful:
        if not _apply_env(candidate):
            continue
        generator = open_generator(plan, candidate.compute_type, layout)
        status = _check(plan, generator, tokenizer, reference, bounds, candidate.compute_type)
        if status is None:  # numerics.check_at_load is off: the cached verdict vouches
            log.info("numerics.check_at_load is off: trusting the verdict for %s", candidate.label)
            status = NumericsStatus(
                str(generator.compute_type),
                True,
                judgement.nll_ratio,
                judgement.agreement_ratio,
                "auto",
            )
        if status.verified:
            return generator, _chosen_by_auto(status, candidate), layout
        _unload(generator)
        reasons.append(f"{candidate.label} failed the check at load")
    raise NumericsRejected(
        "compute_type auto: no candidate computes faithfully here: " + "; ".join(reasons)
    )


def _chosen_by_auto(status: NumericsStatus, candidate: Measurement) -> NumericsStatus:
    return NumericsStatus(
        status.compute_type,
        status.verified,
        status.nll_ratio,
        status.agreement_ratio,
        "auto",
        env=dict(candidate.env),
    )


def _load_explicit(
    plan: LoadPlan,
    tokenizer: HFTokenizer,
    reference: Reference,
    bounds: Bounds,
    layout: tuple[int, int],
) -> tuple[ctranslate2.Generator, NumericsStatus, tuple[int, int]]:
    generator = open_generator(plan, plan.compute_type, layout)
    status = _check(plan, generator, tokenizer, reference, bounds, plan.compute_type)
    if status is None:  # the check is switched off
        off = NumericsStatus(
            str(generator.compute_type),
            False,
            None,
            None,
            "settings",
            warning="numerics.check_at_load is off",
        )
        return generator, off, layout
    if status.verified:
        return generator, status, layout
    assert status.warning is not None
    if plan.numerics is not None and plan.numerics.accept_unverified:
        log.warning("serving unverified numerics (numerics.accept_unverified): %s", status.warning)
        return generator, status, layout
    _unload(generator)
    raise NumericsRejected(
        f"compute_type {plan.compute_type} is not faithful on this machine: {status.warning}; "
        "choose another runtime.compute_type (or auto), or set numerics.accept_unverified"
    )


def _check(
    plan: LoadPlan,
    generator: ctranslate2.Generator,
    tokenizer: HFTokenizer,
    reference: Reference,
    bounds: Bounds,
    compute_type: str,
) -> NumericsStatus | None:
    """The canary: None when the check is off, else its outcome."""
    if plan.numerics is None or not plan.numerics.check_at_load:
        return None
    started = time.perf_counter()
    measurement = measure(generator, tokenizer, reference, compute_type=compute_type, timed=False)
    judgement = judge(measurement, reference, bounds)
    log.info(
        "numerics check of %s in %.1f s: NLL ratio %.3f (bound %g), greedy agreement %.2f of "
        "float32's (bound %g): %s",
        compute_type,
        time.perf_counter() - started,
        judgement.nll_ratio,
        bounds.max_nll_ratio,
        judgement.agreement_ratio,
        bounds.min_agreement_ratio,
        "faithful" if judgement.passed else "NOT faithful",
    )
    return NumericsStatus(
        compute_type=str(generator.compute_type),
        verified=judgement.passed,
        nll_ratio=judgement.nll_ratio,
        agreement_ratio=judgement.agreement_ratio,
        chosen_by="settings",
        warning=judgement.reason,
    )


def _apply_env(candidate: Measurement) -> bool:
    """Set the candidate's kernel environment for this process. False when that cannot
    work: CTranslate2 fixes its kernel choice when imported, so once it is imported the
    environment it saw must already be the candidate's."""
    wanted = {key: candidate.env.get(key) for key in KERNEL_ENV}
    current = {key: os.environ.get(key) for key in KERNEL_ENV}
    if wanted == current:
        return True
    if "ctranslate2" in sys.modules:
        log.info(
            "candidate %s skipped: CTranslate2 is already loaded with %s",
            candidate.label,
            {k: v for k, v in current.items() if v is not None} or "the default kernels",
        )
        return False
    for key, value in wanted.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    return True


def _unload(generator: ctranslate2.Generator) -> None:
    generator.unload_model()
    del generator


__all__ = ["BackendLoadError", "load_checked"]
