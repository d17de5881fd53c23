"""`compute_type = auto`: measure every candidate on this machine once, keep the verdict.

Candidates per device are tried for speed and faithfulness on the reference's probe set
(`core/numerics.py` judges); the fastest faithful one serves. On an Intel CPU the same
types are measured a second time with CT2_USE_MKL=0 (oneDNN's int8 kernels instead of
MKL's, as on AMD CPUs): on an AMX Xeon MKL's int8 answers the README's first question
with nonsense while oneDNN's does not (docs/FINDINGS.md). Each environment is measured
in a child process (`measure.py`) because CTranslate2 picks those kernels once per
process.

The verdict (every measurement, the thread scaling, the machine's identity) is cached
as `verdicts/<machine key>.json` beside the model, so the next start on the same machine
only runs the check at load. Which candidate wins is recomputed from the cached
measurements with the current bounds, so changing a bound needs no new measurement.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from llm_local.backends.base import BackendLoadError
from llm_local.backends.ct2.measure import KERNEL_ENV
from llm_local.backends.shared.threads import choose_layout, intra_candidates, usable_cpus
from llm_local.convert.cache import installed_version, write_json_atomically
from llm_local.convert.reference import PROBE_VERSION
from llm_local.core.numerics import Bounds, Measurement, Reference, candidate_label, choose

log = logging.getLogger("llm_local.backends.ct2.autotune")

# In the order; measured speed decides, not this order.
CPU_CANDIDATES = ("int8", "int8_float32", "int8_bfloat16", "int16", "bfloat16", "float32")
CUDA_CANDIDATES = ("float16", "int8_float16", "bfloat16", "int8_bfloat16", "float32")
VERDICT_DIR = "verdicts"
VERDICT_LAYOUT = 1
MEASURE_TIMEOUT_S = 1800.0


@dataclass(frozen=True, slots=True)
class Verdict:
    key: str
    identity: dict[str, str]
    measurements: tuple[Measurement, ...]
    cpus: int
    # One-stream tokens/s per intra-thread count, for the fastest faithful candidate.
    single_speed_by_threads: dict[int, float] = field(default_factory=dict)
    seconds: float = 0.0  # what measuring cost
    created: str = ""

    def layout(self) -> tuple[int, int]:
        return choose_layout(self.cpus, self.single_speed_by_threads)

    def to_json(self) -> dict[str, Any]:
        return {
            "layout_version": VERDICT_LAYOUT,
            "key": self.key,
            "identity": self.identity,
            "measurements": [m.to_json() for m in self.measurements],
            "cpus": self.cpus,
            "single_speed_by_threads": {str(k): v for k, v in self.single_speed_by_threads.items()},
            "seconds": self.seconds,
            "created": self.created,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Verdict:
        if data.get("layout_version") != VERDICT_LAYOUT:
            raise ValueError("another verdict layout")
        return cls(
            key=str(data["key"]),
            identity={str(k): str(v) for k, v in dict(data["identity"]).items()},
            measurements=tuple(Measurement.from_json(m) for m in data["measurements"]),
            cpus=int(data["cpus"]),
            single_speed_by_threads={
                int(k): float(v) for k, v in dict(data["single_speed_by_threads"]).items()
            },
            seconds=float(data["seconds"]),
            created=str(data.get("created", "")),
        )


def candidates_for(device: str) -> tuple[str, ...]:
    return CPU_CANDIDATES if device == "cpu" else CUDA_CANDIDATES


def environments_for(device: str, identity: Mapping[str, str]) -> list[dict[str, str]]:
    """The process environments to measure in: as it is, and, on an Intel CPU whose
    operator did not choose a GEMM library, with MKL's kernels switched off."""
    if device != "cpu" or "CT2_USE_MKL" in os.environ:
        return [{}]
    if identity.get("cpu_vendor") != "GenuineIntel":
        return [{}]
    return [{}, {"CT2_USE_MKL": "0"}]


def machine_identity(device: str, device_index: int) -> dict[str, str]:
    """What the measurements depend on: the processor (or GPU), CTranslate2, the CPUs
    this process may use and the kernel-choosing environment."""
    cpu = _cpuinfo()
    identity = {
        "device": device if device == "cpu" else f"{device}:{device_index}",
        "cpu_model": cpu.get("model name", platform.processor() or "unknown"),
        "cpu_vendor": cpu.get("vendor_id", "unknown"),
        "cpu_flags": hashlib.sha256(cpu.get("flags", "").encode()).hexdigest()[:12],
        "machine": platform.machine(),
        "ctranslate2": installed_version("ctranslate2"),
        "usable_cpus": str(usable_cpus()),
        "probe_version": str(PROBE_VERSION),
    }
    if device == "cuda":
        identity["gpu"] = _gpu_name(device_index)
        identity["cuda_visible_devices"] = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    for key in KERNEL_ENV:
        if key in os.environ:
            identity[f"env:{key}"] = os.environ[key]
    return identity


def verdict_key(identity: Mapping[str, str]) -> str:
    encoded = json.dumps(dict(identity), sort_keys=True).encode()
    return hashlib.sha256(encoded).hexdigest()[:16]


def verdict_path(model_dir: Path, key: str, verdict_dir: Path | None = None) -> Path:
    """Beside the model, or in `verdict_dir` (numerics.verdict_dir) when the model cache
    is mounted read-only: then named after the model's cache entry as well."""
    if verdict_dir is None:
        return model_dir / VERDICT_DIR / f"{key}.json"
    return verdict_dir / f"{model_dir.parent.name}--{model_dir.name}--{key}.json"


def read_verdict(model_dir: Path, key: str, verdict_dir: Path | None = None) -> Verdict | None:
    path = verdict_path(model_dir, key, verdict_dir)
    try:
        verdict = Verdict.from_json(json.loads(path.read_text("utf-8")))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return verdict if verdict.key == key else None


def write_verdict(model_dir: Path, verdict: Verdict, verdict_dir: Path | None = None) -> bool:
    """Best effort: where it cannot be written, the next start measures again."""
    path = verdict_path(model_dir, verdict.key, verdict_dir)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomically(path, verdict.to_json(), indent=1)
    except OSError as exc:
        log.warning(
            "cannot cache the numerics verdict in %s (%s): the next start measures again; "
            "set numerics.verdict_dir to a writable directory",
            path.parent,
            exc,
        )
        return False
    return True


def measure_candidates(
    model_dir: Path,
    device: str,
    device_index: int,
    identity: Mapping[str, str],
) -> tuple[list[Measurement], dict[str, str]]:
    """Every candidate in every environment; (measurements, skipped candidate -> why)."""
    measurements: list[Measurement] = []
    skipped: dict[str, str] = {}
    for env in environments_for(device, identity):
        result = _run_child(
            {
                "model_dir": str(model_dir),
                "device": device,
                "device_index": device_index,
                "compute_types": list(candidates_for(device)),
            },
            env,
        )
        measurements.extend(Measurement.from_json(m) for m in result["measurements"])
        for compute_type, why in result.get("skipped", {}).items():
            skipped[candidate_label(compute_type, env)] = why
    return measurements, skipped


def measure_thread_scaling(
    model_dir: Path, device: str, device_index: int, candidate: Measurement, cpus: int
) -> dict[int, float]:
    """One-stream speed of `candidate` at 1, 2, 4, ... threads (CPU only)."""
    counts = intra_candidates(cpus)
    if device != "cpu" or len(counts) == 1:
        return {}
    result = _run_child(
        {
            "model_dir": str(model_dir),
            "device": device,
            "device_index": device_index,
            "compute_types": [],
            "thread_types": [candidate.compute_type],
            "thread_counts": counts,
        },
        candidate.env,
    )
    speeds = result["single_speed_by_threads"].get(candidate.compute_type, {})
    return {int(k): float(v) for k, v in speeds.items()}


def new_verdict(
    model_dir: Path,
    device: str,
    device_index: int,
    fastest_faithful: Callable[[list[Measurement]], Measurement | None],
) -> Verdict:
    """Measure on this machine (tens of seconds for a small model). `fastest_faithful`
    picks, from the measurements, the candidate whose thread scaling is measured."""
    started = time.perf_counter()
    identity = machine_identity(device, device_index)
    measurements, skipped = measure_candidates(model_dir, device, device_index, identity)
    for label, why in skipped.items():
        log.info("compute type %s not measured: %s", label, why)
    if not measurements:
        raise BackendLoadError(f"no compute type of {', '.join(candidates_for(device))} runs here")
    cpus = usable_cpus()
    chosen = fastest_faithful(measurements)
    speeds = (
        {}
        if chosen is None
        else measure_thread_scaling(model_dir, device, device_index, chosen, cpus)
    )
    return Verdict(
        key=verdict_key(identity),
        identity=identity,
        measurements=tuple(measurements),
        cpus=cpus,
        single_speed_by_threads=speeds,
        seconds=round(time.perf_counter() - started, 2),
        created=datetime.now(UTC).isoformat(timespec="seconds"),
    )


def measure_verdict(
    model_dir: Path,
    device: str,
    device_index: int,
    reference: Reference,
    bounds: Bounds,
    verdict_dir: Path | None = None,
) -> Verdict:
    """Measure now and cache the verdict (best effort; see `verdict_path`)."""

    def fastest_faithful(measurements: list[Measurement]) -> Measurement | None:
        return choose(measurements, reference, bounds).chosen

    verdict = new_verdict(model_dir, device, device_index, fastest_faithful)
    write_verdict(model_dir, verdict, verdict_dir)
    return verdict


def _run_child(request: dict[str, Any], env: Mapping[str, str]) -> dict[str, Any]:
    command = [sys.executable, "-m", "llm_local.backends.ct2.measure", json.dumps(request)]
    try:
        done = subprocess.run(
            command,
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=MEASURE_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise BackendLoadError(
            f"measuring compute types took over {MEASURE_TIMEOUT_S:g} s"
        ) from exc
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise BackendLoadError(f"measuring compute types failed: {last}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def _cpuinfo() -> dict[str, str]:
    facts: dict[str, str] = {}
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return facts
    for line in text.splitlines():
        if not line.strip():
            break  # the first processor describes them all
        key, _, value = line.partition(":")
        facts[key.strip()] = value.strip()
    return facts


def _gpu_name(device_index: int) -> str:
    for info in sorted(Path("/proc/driver/nvidia/gpus").glob("*/information")):
        if info.parent.name and device_index == 0:
            for line in info.read_text(errors="replace").splitlines():
                if line.startswith("Model:"):
                    return line.partition(":")[2].strip()
        device_index -= 1
    return "unknown"
