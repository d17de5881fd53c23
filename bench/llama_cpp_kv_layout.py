"""What one decode step costs in llama.cpp's shared KV pool against one stream per sequence.

`python -m bench.llama_cpp_kv_layout [SEQUENCES:LENGTH[:IDLE] ...]` (default `1:120 16:120
32:120 16:120:16`): for each spec, the SmolLM2 GGUF is loaded twice with one thread, once
with the pool the `llama_cpp` backend uses (``kv_unified``: every sequence draws cells from
one pool of 8192) and once as llama-server runs with `-np N -c 512N` (``kv_unified`` off:
each sequence its own stream of 512 cells). SEQUENCES sequences read LENGTH prompt tokens
each, IDLE more sequences of LENGTH tokens stay in the cache unused (a finished request
kept for prefix reuse), then 20 steps decode one token per sequence. Printed: the CPU
time of a step (process time, one decoding thread: robust to other load on the machine).

Why it matters: in one pool, a token's attention runs over the pool's whole used range,
its own sequence's cells and everyone else's, masked; with a stream per sequence, over its
own stream only. The masked cells cost little each, but there are (sequences + idle) x
LENGTH of them per token per head per layer.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from llm_local.backends.llama_cpp import library as lib_module
from llm_local.backends.llama_cpp.library import ContextOptions, LoadedLibraryModel, ModelOptions
from llm_local.backends.shared.source import resolve_model_source
from llm_local.settings.loader import load_settings

POOL_TOKENS = 8192  # the backend's default kv_cache_tokens
STREAM_TOKENS = 512  # llama-server's per-slot context in the benchmark (-c 16384 -np 32)
STEPS = 20
WARM_UP_STEPS = 3


def _gguf() -> Path:
    from llm_local.backends.llama_cpp.loader import gguf_path

    settings = load_settings(env="test")
    return gguf_path(resolve_model_source(settings.model), settings.model)


def step_cpu_ms(unified: bool, sequences: int, length: int, idle: int) -> float:
    """CPU milliseconds of one decode step of `sequences` tokens (module docstring)."""
    total = sequences + idle
    original = lib_module.context_params

    def context_params(lib: Any, options: ContextOptions) -> Any:
        params = original(lib, options)
        params.kv_unified = unified
        return params

    lib_module.context_params = context_params
    try:
        lib = lib_module.library()
        model = LoadedLibraryModel(
            lib,
            _gguf(),
            ModelOptions(gpu_layers=0, repack=False),
            ContextOptions(
                kv_cache_tokens=POOL_TOKENS if unified else STREAM_TOKENS * total,
                sequences=total,
                batch_tokens=512,
                threads=1,
            ),
        )
    finally:
        lib_module.context_params = original
    batch = lib.llama_batch_init(512, 0, 1)
    try:

        def decode(rows: list[tuple[int, int, int, int]]) -> float:
            for index, (token, position, seq_id, logits) in enumerate(rows):
                batch.token[index] = token
                batch.pos[index] = position
                batch.n_seq_id[index] = 1
                batch.seq_id[index][0] = seq_id
                batch.logits[index] = logits
            batch.n_tokens = len(rows)
            started = time.process_time()
            if lib.llama_decode(model.ctx, batch) != 0:
                raise RuntimeError("llama_decode failed")
            return time.process_time() - started

        for seq_id in range(total):  # every prompt; the idle ones are never decoded again
            decode([(100 + position % 500, position, seq_id, 0) for position in range(length)])
        spent = 0.0
        for step in range(WARM_UP_STEPS + STEPS):
            seconds = decode([(200, length + step, seq_id, 1) for seq_id in range(sequences)])
            if step >= WARM_UP_STEPS:
                spent += seconds
        return spent / STEPS * 1000
    finally:
        lib.llama_batch_free(batch)
        model.free()


def main(argv: list[str]) -> None:
    for spec in argv or ["1:120", "16:120", "32:120", "16:120:16"]:
        parts = [int(part) for part in spec.split(":")]
        sequences, length, idle = parts[0], parts[1], parts[2] if len(parts) > 2 else 0
        pooled = step_cpu_ms(True, sequences, length, idle)
        streams = step_cpu_ms(False, sequences, length, idle)
        print(
            f"sequences={sequences} length={length} idle={idle}: step CPU ms, one pool "
            f"{pooled:.1f}, a stream each {streams:.1f} (pool / streams = {pooled / streams:.2f}x)",
            flush=True,
        )


if __name__ == "__main__":
    main(sys.argv[1:])
