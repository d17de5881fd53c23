"""`llama_cpp.weights`: the GGUF's weights served as stored, or re-laid once in a type
whose batched CPU kernels are faster.

Why: llama.cpp's CPU kernels for some stored types multiply a matrix by one token row at
a time (Q4_1's ``ggml_vec_dot_q4_1_q8_1``: 56 % of a busy server's CPU time under perf), so
a step of 8 decoding streams costs nearly 8 streams' time and a prompt token nearly a
decoding token's. Types that the library's tiled kernels take (llamafile's sgemm: Q8_0;
BF16 where the CPU computes bfloat16; F16) share each weight across a step's rows. On the
2-core AMD EPYC Zen4, SmolLM2-135M's Q4_1 file served the gateway's mix saturated at 1.00
req/s, re-laid as Q8_0 at 1.36 and as BF16 at 1.64 (docs/FINDINGS.md).

- ``"as_is"``: the file as stored.
- ``"q8_0"``, ``"bf16"``, ``"f16"``: llama.cpp's own quantizer (``llama_model_quantize``,
  requantizing from the dequantized values) writes a copy once into model.cache_dir,
  beside the conversions (``<slug>/gguf-<type>-<key>/model.gguf``, manifest last, under
  the cache's lock); later starts read it. From a 4-bit file Q8_0 keeps every value to
  within 1/254 of its block's largest, BF16 and F16 to 2^-9 and 2^-11 of itself. The
  numerics check at load judges what is served, as it judges the file.
- ``"auto"`` (the default): on the CPU, the file and its Q8_0 copy (`candidates` says why
  not the 16-bit types) are timed once on this machine
  (`step_cost`: a busy step's prompt token and decoded token, and a lone stream's token),
  and the cheapest busy step serves among the weights that do not slow a lone stream down
  (`LONE_TOLERANCE`): the file, unless a copy is at least `MIN_GAIN` cheaper (a single
  call must not pay for a crowd's gain).
  The verdict is kept per machine beside the copies, so later starts only load.
  A candidate whose weights would take more than `MEMORY_SHARE` of the memory available
  is not tried: decoding reads every weight at every step, and more bytes a weight pay
  only where computing, not reading, bounds a step (small models). On a GPU
  (``gpu_layers`` above 0) the file serves as stored. Where a copy cannot be written (a
  read-only cache that lacks it), `auto` serves the file and says why; `llm-local convert`
  prepares the copies and the verdict ahead, as an init container does.
"""

from __future__ import annotations

import ctypes
import json
import logging
import platform
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from llm_local.backends.base import BackendLoadError
from llm_local.backends.llama_cpp.library import (
    ContextOptions,
    LoadedLibraryModel,
    ModelOptions,
    file_type,
)
from llm_local.backends.shared.cpu import cpu_flags, cpu_model
from llm_local.convert import cache
from llm_local.convert.sources import ModelSource

log = logging.getLogger("llm_local.backends.llama_cpp")

AS_IS = "as_is"
AUTO = "auto"
# The re-laid types and llama.cpp's file types for them (llama_ftype).
RELAID_FTYPES = {
    "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
    "bf16": "LLAMA_FTYPE_MOSTLY_BF16",
    "f16": "LLAMA_FTYPE_MOSTLY_F16",
}
BITS_PER_WEIGHT = {"q8_0": 8.5, "bf16": 16.0, "f16": 16.0}
WEIGHT_CHOICES = (AUTO, AS_IS, *RELAID_FTYPES)
# A copy must make the measured step this much cheaper than the file to be served: less
# is within a busy machine's noise, and the copy costs disk and memory.
MIN_GAIN = 1.10
# A copy may decode one stream alone at most this much slower than the file (noise).
LONE_TOLERANCE = 1.05
MEMORY_SHARE = 0.25
MODEL_FILE = "model.gguf"
VERDICT_DIR = "weights-verdicts"
# Bump when the copies' content changes shape (a new copy), or the measurement's (a new
# verdict).
LAYOUT_VERSION = 1
MEASURE_VERSION = 3

# The measured shape: a busy server's step pair. SEQUENCES streams each read PROMPT_TOKENS
# in one batch (a prompt chunk), then decode DECODE_STEPS steps of one token each.
SEQUENCES = 8
PROMPT_TOKENS = 16
DECODE_STEPS = 4
ROUNDS = 3  # each candidate keeps its cheapest round: other load can only slow one down


class WeightsError(BackendLoadError):
    retryable = False


@dataclass(frozen=True, slots=True)
class WeightsPlan:
    """What `serving_weights` needs: the file, where copies go, how to measure."""

    gguf: Path
    source: ModelSource
    cache_dir: Path
    setting: str  # one of WEIGHT_CHOICES
    threads: int
    gpu_layers: int
    repack: bool


def candidates(stored_type: str) -> tuple[str, ...]:
    """The copies `auto` measures beside the file: Q8_0 (never the file's own type).

    Not the 16-bit types: on the 2-core AMD EPYC (AVX512-BF16) a BF16 copy made the busy
    step cheapest (1.64 against Q8_0's 1.36 req/s saturated) but decoded one stream at
    0.78x llama-server's tokens/s on the file, and the lone-stream part of the measurement
    did not see it every time (one start measured BF16's lone token at 0.98x the file's,
    in-process streams gave 0.86x): twice the bytes a weight, read at every step, cost a
    lone stream more than a short measurement shows. They stay a setting ("bf16", "f16")
    for a server that is always busy."""
    return () if stored_type == "q8_0" else ("q8_0",)


def fits_memory(parameters: int, weight_type: str, available_bytes: int | None) -> bool:
    """Whether `weight_type`'s copy of `parameters` weights stays within MEMORY_SHARE of
    the memory available (unknown: assumed to)."""
    if available_bytes is None:
        return True
    return parameters * BITS_PER_WEIGHT[weight_type] / 8 <= MEMORY_SHARE * available_bytes


@dataclass(frozen=True, slots=True)
class StepCost:
    """What `step_cost` measured for one set of weights, in seconds."""

    busy_s: float  # a prompt token read plus a token decoded, among SEQUENCES streams
    lone_s: float  # a token decoded by one stream alone

    def to_json(self) -> dict[str, float]:
        return {"busy_s": self.busy_s, "lone_s": self.lone_s}


def choose(costs: Mapping[str, StepCost]) -> str:
    """The weights whose busy step is cheapest among those that decode a lone stream
    within LONE_TOLERANCE of the file; a copy only if at least MIN_GAIN cheaper than the
    file (AS_IS must be measured)."""
    file = costs[AS_IS]
    eligible = {
        kind: cost
        for kind, cost in costs.items()
        if kind == AS_IS or cost.lone_s <= file.lone_s * LONE_TOLERANCE
    }
    best = min(eligible, key=lambda kind: eligible[kind].busy_s)
    if best != AS_IS and eligible[best].busy_s * MIN_GAIN <= file.busy_s:
        return best
    return AS_IS


def available_memory(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """MemAvailable in bytes, or None where it cannot be read."""
    try:
        for line in meminfo.read_text(encoding="utf-8").splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def serving_weights(lib: Any, plan: WeightsPlan) -> Path:
    """The GGUF to serve, per the setting (module docstring); prepares a copy when needed."""
    if plan.setting == AS_IS or (plan.setting == AUTO and plan.gpu_layers > 0):
        return plan.gguf
    if plan.setting != AUTO:
        return ensure_relaid(lib, plan, plan.setting)
    identity = _machine_identity(plan)
    verdict_path = _verdict_path(plan, identity)
    chosen = _read_choice(verdict_path)
    if chosen is None:
        chosen = _measure_and_keep(lib, plan, identity, verdict_path)
    if chosen == AS_IS:
        return plan.gguf
    try:
        return ensure_relaid(lib, plan, chosen)
    except WeightsError as exc:  # a read-only cache that lacks the copy: serve the file
        log.warning("llama.cpp weights: serving the file as stored: %s", exc)
        return plan.gguf


def relaid_inputs(source: ModelSource, weight_type: str) -> dict[str, str]:
    """Everything that, when it changes, must give another copy."""
    return {
        **cache.source_inputs(source, LAYOUT_VERSION),
        "weights": weight_type,
        # The quantizer is the library's: another release may write another file.
        "llama_cpp_python": cache.installed_version("llama-cpp-python"),
    }


def relaid_path(cache_dir: Path, source: ModelSource, weight_type: str) -> Path:
    key = cache.inputs_key(relaid_inputs(source, weight_type))
    return cache_dir / source.slug / f"gguf-{weight_type}-{key}" / MODEL_FILE


def find_relaid(cache_dir: Path, source: ModelSource, weight_type: str) -> Path | None:
    path = relaid_path(cache_dir, source, weight_type)
    expected = {"inputs": relaid_inputs(source, weight_type)}
    return path if cache.read_entry(path.parent, expected, MODEL_FILE) else None


def ensure_relaid(lib: Any, plan: WeightsPlan, weight_type: str) -> Path:
    """The copy of the file in `weight_type`, written first when the cache lacks it."""
    found = find_relaid(plan.cache_dir, plan.source, weight_type)
    if found is not None:
        return found
    target = relaid_path(plan.cache_dir, plan.source, weight_type).parent
    try:
        with cache.conversion_lock(plan.cache_dir):
            found = find_relaid(plan.cache_dir, plan.source, weight_type)
            if found is not None:
                return found
            work_dir = cache.new_work_dir(plan.cache_dir)
            try:
                built = work_dir / "relaid"
                built.mkdir()
                started = time.perf_counter()
                _quantize(lib, plan.gguf, built / MODEL_FILE, weight_type, plan.threads)
                cache.write_manifest(
                    built,
                    {
                        "inputs": relaid_inputs(plan.source, weight_type),
                        "source": plan.source.spec,
                        "created": datetime.now(UTC).isoformat(timespec="seconds"),
                        "files": [MODEL_FILE],
                    },
                )
                cache.install(built, target, work_dir)
            finally:
                shutil.rmtree(work_dir, ignore_errors=True)
    except OSError as exc:
        raise WeightsError(
            f"cannot keep the {weight_type} copy of {plan.gguf.name} in {plan.cache_dir} "
            f'({exc}): make model.cache_dir writable, or set llama_cpp.weights = "as_is"'
        ) from exc
    log.info(
        "llama.cpp weights: %s re-laid as %s in %.1f s, kept at %s",
        plan.gguf.name,
        weight_type,
        time.perf_counter() - started,
        target,
    )
    return target / MODEL_FILE


def _quantize(lib: Any, gguf: Path, out: Path, weight_type: str, threads: int) -> None:
    params = lib.llama_model_quantize_default_params()
    params.ftype = getattr(lib, RELAID_FTYPES[weight_type])
    params.allow_requantize = True
    params.nthread = threads
    status = int(
        lib.llama_model_quantize(str(gguf).encode(), str(out).encode(), ctypes.byref(params))
    )
    if status != 0 or not out.is_file():
        raise WeightsError(
            f"llama.cpp could not re-lay {gguf.name} as {weight_type} (status {status}); "
            'set llama_cpp.weights = "as_is" to serve the file as stored'
        )


def step_cost(lib: Any, path: Path, threads: int, repack: bool) -> tuple[StepCost, str, int]:
    """(what a busy and a lone step cost with the GGUF at `path`; its file type; its
    parameter count). Each part keeps its cheapest of ROUNDS rounds."""
    handle = LoadedLibraryModel(
        lib,
        path,
        ModelOptions(gpu_layers=0, repack=repack),
        ContextOptions(
            kv_cache_tokens=SEQUENCES * (PROMPT_TOKENS + DECODE_STEPS + 1) + 256,
            sequences=SEQUENCES,
            batch_tokens=SEQUENCES * PROMPT_TOKENS,
            threads=threads,
        ),
    )
    batch = lib.llama_batch_init(SEQUENCES * PROMPT_TOKENS, 0, 1)
    try:
        token = max(0, int(lib.llama_vocab_bos(handle.vocab)))

        def decode_s(sequences: int) -> float:
            """Seconds of DECODE_STEPS one-token steps of `sequences` streams."""
            return sum(
                _timed_step(lib, handle.ctx, batch, token, sequences, 1, PROMPT_TOKENS + step)
                for step in range(DECODE_STEPS)
            )

        busy = lone = float("inf")
        for _ in range(ROUNDS):
            read_s = _timed_step(lib, handle.ctx, batch, token, SEQUENCES, PROMPT_TOKENS, 0)
            busy_decode_s = decode_s(SEQUENCES)
            lib.llama_memory_clear(handle.memory, True)
            _timed_step(lib, handle.ctx, batch, token, 1, PROMPT_TOKENS, 0)
            lone_decode_s = decode_s(1)
            lib.llama_memory_clear(handle.memory, True)
            busy = min(
                busy,
                read_s / (SEQUENCES * PROMPT_TOKENS) + busy_decode_s / (SEQUENCES * DECODE_STEPS),
            )
            lone = min(lone, lone_decode_s / DECODE_STEPS)
        parameters = int(lib.llama_model_n_params(handle.model))
        return StepCost(busy, lone), file_type(handle.description()), parameters
    finally:
        lib.llama_batch_free(batch)
        handle.free()


def _timed_step(
    lib: Any, ctx: Any, batch: Any, token: int, sequences: int, per_sequence: int, first: int
) -> float:
    """Seconds of one llama_decode of `per_sequence` tokens for each of `sequences`
    sequences, at positions first.. (logits of each sequence's last row, as serving)."""
    n = 0
    for sequence in range(sequences):
        for offset in range(per_sequence):
            batch.token[n] = token
            batch.pos[n] = first + offset
            batch.n_seq_id[n] = 1
            batch.seq_id[n][0] = sequence
            batch.logits[n] = offset == per_sequence - 1
            n += 1
    batch.n_tokens = n
    started = time.perf_counter()
    status = int(lib.llama_decode(ctx, batch))
    elapsed = time.perf_counter() - started
    if status != 0:
        raise WeightsError(f"llama_decode failed (status {status}) while timing the weights")
    return elapsed


def _measure_and_keep(
    lib: Any, plan: WeightsPlan, identity: Mapping[str, str], verdict_path: Path
) -> str:
    started = time.perf_counter()

    def measure(path: Path) -> tuple[StepCost, str, int]:
        return step_cost(lib, path, plan.threads, plan.repack)

    file_cost, stored_type, parameters = measure(plan.gguf)
    costs = {AS_IS: file_cost}
    memory = available_memory()
    skipped: list[str] = []
    for weight_type in candidates(stored_type):
        if not fits_memory(parameters, weight_type, memory):
            skipped.append(weight_type)
            continue
        try:
            copy = ensure_relaid(lib, plan, weight_type)
        except WeightsError as exc:  # e.g. a read-only cache: `auto` still serves
            log.warning("llama.cpp weights: %s not tried: %s", weight_type, exc)
            continue
        costs[weight_type] = measure(copy)[0]
    chosen = choose(costs)
    log.info(
        "llama.cpp weights: %s serves (measured on this machine, ms of a busy step's "
        "prompt token + decoded token / of a lone stream's token: %s%s) in %.1f s",
        stored_type if chosen == AS_IS else f"{chosen} (re-laid from {stored_type})",
        ", ".join(
            f"{stored_type if kind == AS_IS else kind} {cost.busy_s * 1000:.2f} / "
            f"{cost.lone_s * 1000:.2f}"
            for kind, cost in costs.items()
        ),
        f"; too large to try: {', '.join(skipped)}" if skipped else "",
        time.perf_counter() - started,
    )
    verdict = {
        "identity": dict(identity),
        "stored_type": stored_type,
        "costs": {kind: cost.to_json() for kind, cost in costs.items()},
        "skipped": skipped,
        "chosen": chosen,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    try:
        verdict_path.parent.mkdir(parents=True, exist_ok=True)
        cache.write_json_atomically(verdict_path, verdict, indent=2, sort_keys=True)
    except OSError as exc:
        log.warning(
            "cannot keep the weights verdict at %s (%s): measured again next start",
            verdict_path,
            exc,
        )
    return chosen


def _machine_identity(plan: WeightsPlan) -> dict[str, str]:
    """What the measurement depends on: the source, the processor, the library, threads."""
    return {
        **cache.source_inputs(plan.source, LAYOUT_VERSION),
        "cpu_model": cpu_model(),
        "cpu_flags": cache.inputs_key({"flags": " ".join(sorted(cpu_flags()))}),
        "machine": platform.machine(),
        "llama_cpp_python": cache.installed_version("llama-cpp-python"),
        "threads": str(plan.threads),
        "repack": str(plan.repack),
        "measure_version": str(MEASURE_VERSION),
    }


def _verdict_path(plan: WeightsPlan, identity: Mapping[str, str]) -> Path:
    return plan.cache_dir / plan.source.slug / VERDICT_DIR / f"{cache.inputs_key(identity)}.json"


def _read_choice(path: Path) -> str | None:
    """The kept verdict's choice, or None (absent, unreadable, of an unknown type)."""
    try:
        verdict = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    chosen = verdict.get("chosen") if isinstance(verdict, dict) else None
    return chosen if chosen == AS_IS or chosen in RELAID_FTYPES else None
