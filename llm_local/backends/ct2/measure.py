"""`python -m llm_local.backends.ct2.measure REQUEST_JSON`: measure compute types.

Runs in a child process because some CPU kernels are chosen once per process from the
environment (CTranslate2 fixes its CT2_USE_MKL choice when it is imported): a
candidate such as "int8 with CT2_USE_MKL=0" can only be measured in a process started
with that environment. The parent (autotune.py) starts one child per environment.

Request: {"model_dir", "device", "device_index", "compute_types": [...], and for the
thread scaling "thread_types": [...], "thread_counts": [...]}. Prints one JSON line:
{"measurements": [...], "single_speed_by_threads": {type: {threads: tokens/s}},
"skipped": {type: why}}.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llm_local.backends.ct2.canary import THREAD_RUNS, decode_speed, measure
from llm_local.backends.hf_tokenizer import HFTokenizer
from llm_local.convert.reference import read_reference

if TYPE_CHECKING:
    import ctranslate2

# The variables whose values make a candidate differ (recorded with each measurement).
KERNEL_ENV = ("CT2_USE_MKL", "CT2_FORCE_CPU_ISA")


def run(request: dict[str, Any]) -> dict[str, Any]:
    import ctranslate2

    model_dir = Path(request["model_dir"])
    device = str(request["device"])
    device_index = int(request.get("device_index", 0))
    reference = read_reference(model_dir)
    if reference is None:
        raise SystemExit(f"{model_dir} has no numerics reference; run `llm-local convert`")
    tokenizer = HFTokenizer.from_directory(model_dir)
    supported = set(ctranslate2.get_supported_compute_types(device, device_index))
    env = {key: os.environ[key] for key in KERNEL_ENV if key in os.environ}
    measurements: list[dict[str, Any]] = []
    skipped: dict[str, str] = {}
    seen_effective: dict[str, dict[str, Any]] = {}
    for compute_type in request["compute_types"]:
        if compute_type not in supported:
            skipped[compute_type] = f"not supported on {device} here"
            continue
        started = time.perf_counter()
        generator = _open(model_dir, device, device_index, compute_type, threads=1)
        load_seconds = time.perf_counter() - started
        effective = str(generator.compute_type)
        if effective in seen_effective:
            # "int8" runs as int8_float32 on a CPU: the same computation, measured once.
            same = dict(seen_effective[effective], compute_type=compute_type)
            measurements.append(same)
        else:
            result = measure(
                generator,
                tokenizer,
                reference,
                compute_type=compute_type,
                env=env,
                load_seconds=load_seconds,
            ).to_json()
            seen_effective[effective] = result
            measurements.append(result)
        generator.unload_model()
        del generator
    speeds = {
        compute_type: single_speeds(
            model_dir,
            device,
            device_index,
            compute_type,
            request["thread_counts"],
            tokenizer,
            reference.items[0].prompt_ids,
        )
        for compute_type in request.get("thread_types", [])
        if compute_type in supported
    }
    return {"measurements": measurements, "single_speed_by_threads": speeds, "skipped": skipped}


def single_speeds(
    model_dir: Path,
    device: str,
    device_index: int,
    compute_type: str,
    thread_counts: list[int],
    tokenizer: HFTokenizer,
    prompt: Sequence[int],
) -> dict[str, float]:
    """One-stream tokens/s of `prompt` at each intra-thread count."""
    speeds: dict[str, float] = {}
    for threads in thread_counts:
        generator = _open(model_dir, device, device_index, compute_type, threads=threads)
        speeds[str(threads)] = decode_speed(generator, tokenizer, [prompt], runs=THREAD_RUNS)
        generator.unload_model()
        del generator
    return speeds


def _open(
    model_dir: Path, device: str, device_index: int, compute_type: str, *, threads: int
) -> ctranslate2.Generator:
    """One worker of `threads` threads: candidates are compared on equal terms."""
    import ctranslate2

    return ctranslate2.Generator(
        str(model_dir),
        device=device,
        device_index=device_index,
        compute_type=compute_type,
        inter_threads=1,
        intra_threads=threads,
    )


def main(argv: list[str]) -> int:
    result = run(json.loads(argv[0]))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
