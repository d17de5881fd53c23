"""What a user runs: the settings every llm-local variant serves with, and the kernels the
in-process ceiling must run to be a ceiling of that.

Every server variant runs its defaults: `compute_type = "auto"` and threads `"auto"` (the
fastest compute type that passes the numerics check on this machine, from the verdict
cached beside the model, and the measured thread layout), the numerics check at load on,
llama_cpp's threads measured at load. What each server then really ran (compute type,
kernel environment, threads, numerics verdict) is read from its /health and /config and
goes into the report: a headline number comes from a verified configuration or says it
did not.

The in-process ceiling (ct2-stream, ct2-batch) runs what the ct2 server chose: the same
verdict and the same rule (`core.numerics.choose`) give the compute type, its kernel
environment (CTranslate2 fixes its kernels at import: set here before the first import)
and the thread layout. A pinned configuration (`--pin-compute-type`) runs as well-labelled
extra rows, never instead.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llm_local.settings.legacy import nested_env_var

# The defaults a user gets, over ENV=test (which pins float32 and 2x1 threads so that
# tests may assert on answer text), by dotted key.
DEFAULT_VALUES = {
    "runtime.compute_type": "auto",
    "runtime.inter_threads": "auto",
    "runtime.intra_threads": "auto",
    "numerics.check_at_load": "true",
    "llama_cpp.threads": "auto",
    "llama_cpp.weights": "auto",
    "transformers.threads": "auto",
    "transformers.dtype": "auto",
}
# The same as a server's environment variables.
DEFAULT_SETTINGS = {nested_env_var(key): value for key, value in DEFAULT_VALUES.items()}


def backend_defaults() -> dict[str, str]:
    """DEFAULT_VALUES of the backends' own sections (threads, dtype) as `load_settings`
    overrides, for a backend run in process (no server, no numerics check); a setting
    given in the environment wins, as for a server."""
    return {
        key: os.environ.get(nested_env_var(key), value)
        for key, value in DEFAULT_VALUES.items()
        if key.startswith(("llama_cpp.", "transformers."))
    }


@dataclass(frozen=True, slots=True)
class Kernels:
    """The CTranslate2 configuration the ct2 server chose on this machine."""

    compute_type: str  # as requested ("int8"); CTranslate2 may report "int8_float32"
    env: dict[str, str] = field(default_factory=dict)  # e.g. {"CT2_USE_MKL": "0"}
    inter_threads: int = 1
    intra_threads: int = 1
    verified: bool = False
    how: str = ""  # where the choice came from, for the report

    def to_json(self) -> dict[str, Any]:
        return {
            "compute_type": self.compute_type,
            "kernel_env": dict(self.env),
            "inter_threads": self.inter_threads,
            "intra_threads": self.intra_threads,
            "verified": self.verified,
            "how": self.how,
        }


def server_kernels(model_dir: Path, log: Any = print) -> Kernels:
    """The ct2 server's choice under default settings: its cached verdict (measured now
    and cached, as the server's first start would, when there is none)."""
    from llm_local.backends.ct2 import autotune
    from llm_local.convert.reference import read_reference
    from llm_local.core.numerics import Bounds, choose
    from llm_local.settings.loader import load_settings

    settings = load_settings(env="test").numerics
    bounds = Bounds(settings.max_nll_ratio, settings.min_agreement_ratio)
    reference = read_reference(model_dir)
    if reference is None:
        raise RuntimeError(f"{model_dir} has no numerics reference: run `llm-local convert`")
    key = autotune.verdict_key(autotune.machine_identity("cpu", 0))
    verdict = autotune.read_verdict(model_dir, key, settings.verdict_dir)
    how = "the cached verdict"
    if verdict is None:
        log("bench: measuring compute types on this machine, as the server's first start would")
        verdict = autotune.measure_verdict(
            model_dir, "cpu", 0, reference, bounds, settings.verdict_dir
        )
        how = "a verdict measured now"
    choice = choose(verdict.measurements, reference, bounds)
    if choice.chosen is None:
        raise RuntimeError("no compute type passes the numerics check on this machine")
    inter, intra = verdict.layout()
    chosen = choice.chosen
    return Kernels(chosen.compute_type, dict(chosen.env), inter, intra, True, how)


def apply_kernel_env(kernels: Kernels) -> None:
    """Give this process the chosen kernels' environment; CTranslate2 must not be imported
    yet (it reads it once)."""
    from llm_local.backends.ct2.measure import KERNEL_ENV

    wanted = {key: kernels.env.get(key) for key in KERNEL_ENV}
    current = {key: os.environ.get(key) for key in KERNEL_ENV}
    if wanted == current:
        return
    if "ctranslate2" in sys.modules:
        raise RuntimeError(
            f"CTranslate2 was imported before the kernels were chosen ({current} != {wanted})"
        )
    for key, value in wanted.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def served(health: Mapping[str, Any], config: Mapping[str, Any]) -> dict[str, Any]:
    """What a running server says it serves: for the report beside its numbers."""
    loaded = dict(config.get("effective", {}).get("loaded_model") or {})
    numerics = health.get("numerics") or {}
    return {
        "backend": health.get("backend"),
        "compute_type": loaded.get("compute_type"),
        "threads": loaded.get("threads"),
        "numerics_verified": bool(numerics.get("verified")),
        "numerics": numerics or None,
    }
