"""Does a quantized model still compute what the original computed? Pure judgement.

The reference (recorded once at conversion, see `llm_local.convert.reference`) holds a
small probe set: chat prompts rendered with the model's own template, the greedy answers
of the *unquantized* weights, and the mean negative log-likelihood per token of those
answers under them. It also holds the *anchor*: the same probe run in float32 on the
stored (possibly quantized) weights, i.e. the best any compute type can do with them.

A candidate compute type is measured on the probe (greedy answers + one teacher-forced
scoring pass) and judged on two numbers:

- `nll_ratio`: its NLL of the reference answers over the reference's own NLL. A broken
  kernel shows here at once (int16 on an AMX Xeon: x4); a healthy int8 costs a few %.
- `agreement_ratio`: how much of each reference answer it reproduces greedily before its
  first different token, over the same figure for the anchor. Greedy agreement is what a
  user sees (the README's example), and dividing by the anchor's figure cancels what
  the stored weights lose on every machine alike, leaving what this machine's kernels
  lose on top. See docs/FINDINGS.md for the measurements the default bounds come from.

Nothing here does I/O, loads a model or knows CTranslate2.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class ProbeItem:
    prompt_ids: tuple[int, ...]
    answer_ids: tuple[int, ...]  # the unquantized model's greedy answer (end token excluded)


@dataclass(frozen=True, slots=True)
class Anchor:
    """The probe computed in float32 on the stored weights (recorded at conversion)."""

    nll: float
    agreement: float


@dataclass(frozen=True, slots=True)
class Reference:
    probe_version: int
    max_new_tokens: int
    items: tuple[ProbeItem, ...]
    nll: float  # mean NLL per answer token under the unquantized weights
    anchor: Anchor

    def to_json(self) -> dict[str, Any]:
        return {
            "probe_version": self.probe_version,
            "max_new_tokens": self.max_new_tokens,
            "nll": self.nll,
            "anchor": asdict(self.anchor),
            "items": [
                {"prompt_ids": list(item.prompt_ids), "answer_ids": list(item.answer_ids)}
                for item in self.items
            ],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Reference:
        """Raises KeyError, TypeError or ValueError when `data` is not a reference."""
        items = tuple(
            ProbeItem(
                tuple(int(i) for i in raw["prompt_ids"]), tuple(int(i) for i in raw["answer_ids"])
            )
            for raw in data["items"]
        )
        if not items:
            raise ValueError("a reference needs at least one probe item")
        anchor = data["anchor"]
        return cls(
            probe_version=int(data["probe_version"]),
            max_new_tokens=int(data["max_new_tokens"]),
            items=items,
            nll=float(data["nll"]),
            anchor=Anchor(nll=float(anchor["nll"]), agreement=float(anchor["agreement"])),
        )


@dataclass(frozen=True, slots=True)
class Measurement:
    """One compute type run on the probe set, on this machine."""

    compute_type: str  # as requested ("int8")
    effective_type: str  # what the device really ran ("int8_float32")
    nll: float  # mean NLL per token of the reference answers, teacher-forced
    agreement: float  # see `greedy_agreement`
    equal_answers: int  # answers identical to the reference's, token for token
    batch_tokens_per_s: float  # the whole probe set decoded as one batch
    single_tokens_per_s: float  # one probe prompt alone
    load_seconds: float
    # Process environment the type ran under (e.g. {"CT2_USE_MKL": "0"}): some CPU
    # kernels are chosen per process, so a candidate is a type *and* an environment.
    env: dict[str, str] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return candidate_label(self.compute_type, self.env)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Measurement:
        return cls(
            compute_type=str(data["compute_type"]),
            effective_type=str(data["effective_type"]),
            nll=float(data["nll"]),
            agreement=float(data["agreement"]),
            equal_answers=int(data["equal_answers"]),
            batch_tokens_per_s=float(data["batch_tokens_per_s"]),
            single_tokens_per_s=float(data["single_tokens_per_s"]),
            load_seconds=float(data["load_seconds"]),
            env={str(k): str(v) for k, v in dict(data.get("env") or {}).items()},
        )


@dataclass(frozen=True, slots=True)
class Bounds:
    max_nll_ratio: float  # candidate NLL / reference NLL must not exceed this
    min_agreement_ratio: float  # candidate agreement / anchor agreement must reach this


@dataclass(frozen=True, slots=True)
class Judgement:
    passed: bool
    nll_ratio: float
    agreement_ratio: float
    reason: str | None  # why it failed; None when it passed


def candidate_label(compute_type: str, env: Mapping[str, str]) -> str:
    """ "int8" or "int8 (CT2_USE_MKL=0)": how tables and logs name a candidate."""
    if not env:
        return compute_type
    settings = ", ".join(f"{key}={value}" for key, value in sorted(env.items()))
    return f"{compute_type} ({settings})"


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    count = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        count += 1
    return count


def greedy_agreement(
    reference: Sequence[Sequence[int]], candidate: Sequence[Sequence[int]]
) -> tuple[float, int]:
    """(mean share of each reference answer reproduced before the first different token,
    number of answers reproduced exactly).

    A candidate answer that runs on past the reference's end does not lose agreement
    for it (the reference's end token was a near-tie); one that stops early does.
    """
    if len(reference) != len(candidate):
        raise ValueError(f"{len(candidate)} candidate answers for {len(reference)} references")
    if not reference:
        raise ValueError("no answers to compare")
    shares = []
    equal = 0
    for ref, cand in zip(reference, candidate, strict=True):
        if not ref:
            shares.append(1.0 if not cand else 0.0)
            equal += not cand
            continue
        shares.append(common_prefix(ref, cand) / len(ref))
        equal += list(ref) == list(cand)
    return sum(shares) / len(shares), equal


def judge(measurement: Measurement, reference: Reference, bounds: Bounds) -> Judgement:
    nll_ratio = measurement.nll / reference.nll if reference.nll > 0 else float("inf")
    if reference.nll <= 0 and measurement.nll <= 0:
        nll_ratio = 1.0
    anchor = reference.anchor.agreement
    # An anchor that reproduces nothing leaves nothing to lose: judge by NLL alone.
    agreement_ratio = measurement.agreement / anchor if anchor > 0 else 1.0
    problems = []
    if nll_ratio > bounds.max_nll_ratio:
        problems.append(
            f"NLL ratio {nll_ratio:.3f} above the bound {bounds.max_nll_ratio:g}"
            " (numerics.max_nll_ratio)"
        )
    if agreement_ratio < bounds.min_agreement_ratio:
        problems.append(
            f"greedy agreement {measurement.agreement:.2f} is {agreement_ratio:.2f} of float32's "
            f"{anchor:.2f}, below the bound {bounds.min_agreement_ratio:g}"
            " (numerics.min_agreement_ratio)"
        )
    reason = f"{measurement.label}: " + "; ".join(problems) if problems else None
    return Judgement(not problems, nll_ratio, agreement_ratio, reason)


@dataclass(frozen=True, slots=True)
class Choice:
    """What `choose` picked, with every candidate's judgement (fastest first)."""

    chosen: Measurement | None  # None: no candidate passed
    ranked: tuple[tuple[Measurement, Judgement], ...]

    @property
    def fastest(self) -> Measurement | None:
        return self.ranked[0][0] if self.ranked else None


def rank_by_speed(measurements: Iterable[Measurement]) -> list[Measurement]:
    """Fastest first: batched throughput is what a loaded server lives on; the one-stream
    rate breaks ties."""
    return sorted(
        measurements,
        key=lambda m: (m.batch_tokens_per_s, m.single_tokens_per_s),
        reverse=True,
    )


def choose(measurements: Iterable[Measurement], reference: Reference, bounds: Bounds) -> Choice:
    """The fastest candidate that passes."""
    ranked = tuple((m, judge(m, reference, bounds)) for m in rank_by_speed(measurements))
    chosen = next((m for m, verdict in ranked if verdict.passed), None)
    return Choice(chosen, ranked)


@dataclass(frozen=True, slots=True)
class NumericsStatus:
    """What serves, and how far it can be trusted: read by /health, /config, /metrics."""

    compute_type: str
    verified: bool  # the check at load passed
    nll_ratio: float | None  # None: not checked (no reference)
    agreement_ratio: float | None
    chosen_by: str  # "auto" or "settings"
    warning: str | None = None  # set when serving unverified numerics
    env: dict[str, str] = field(default_factory=dict)  # kernel environment (CT2_USE_MKL=0)

    def to_json(self) -> dict[str, Any]:
        return {
            "compute_type": self.compute_type,
            "verified": self.verified,
            "nll_ratio": None if self.nll_ratio is None else round(self.nll_ratio, 4),
            "agreement_ratio": (
                None if self.agreement_ratio is None else round(self.agreement_ratio, 4)
            ),
            "chosen_by": self.chosen_by,
            "kernel_env": dict(self.env),
            "warning": self.warning,
        }
