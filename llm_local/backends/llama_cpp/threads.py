"""How many threads llama.cpp decodes with, when `threads = "auto"`: measured at load.

llama.cpp's CPU kernels meet at a barrier after every operation (hundreds per step). When
the process's CPUs are shared (other processes, a busy host), a thread descheduled at a
barrier stalls all the others: on the 2-core development machine, shared with three other
test runs, 2 threads decoded 1.6 tokens/s where 1 thread decoded 73. So the count is not
assumed from the CPUs we may use: at load a few steps are timed at 1, 2, 4, ... threads
(up to those CPUs, `shared.threads.usable_cpus`) and the shared rule
(`shared.threads.choose_layout`) picks, with its own bar: a doubling must pay
`MIN_DOUBLING_GAIN` (1.15x), not the 1.5x ct2 asks. ct2 can spend a CPU a batch does not
take on a second worker; here one context decodes everything, so a CPU the decoding threads
leave goes unused, and a thread need only pay for itself beyond the measurement's noise.

What is timed is a step of `PROBE_ROWS` tokens, the shape of a busy server's step, not one
stream's: a second thread pays most where a server is loaded (the 1-thread server served
73 / 117 / 117 tokens/s at 1 / 16 / 32 streams where 2 threads served 88 / 187 / 143 in the
same run), while a one-token step of a small model gains little and varies from run to run
(on the quiet 2-core AMD machine, 1.58x at one load and 1.08x at the next, the same day: the
server that measured 1.08x chose 1 thread and served the gateway's 0.92 req/s at TPOT p95 695 ms).
It takes about a second for a small model and follows the machine the service really runs
on; a loaded machine's second thread, stalling at every barrier, fails any bar.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from llm_local.backends.shared.threads import choose_layout, intra_candidates

log = logging.getLogger("llm_local.backends.llama_cpp")

MIN_DOUBLING_GAIN = 1.15
PROBE_STEPS = 8  # steps timed per thread count and round (after a warm-up step)
PROBE_ROWS = 8  # tokens per step: a batch, as a busy server decodes
# Rounds over the thread counts, interleaved; each count keeps its fastest round: whatever
# else runs can only slow a round down.
PROBE_ROUNDS = 3
PROBE_SEQUENCE = 0  # the sequence the probe borrows; freed before serving starts


def measure_threads(
    lib: Any, ctx: Any, memory: Any, token: int, cpus: int, room: int = 1 << 30
) -> int:
    """The thread count to decode with, from one-stream speeds measured now (each
    count's fastest of PROBE_ROUNDS interleaved rounds). `room`: the positions a sequence
    may hold, which bounds the probe's steps."""
    candidates = intra_candidates(cpus)
    if len(candidates) == 1:
        lib.llama_set_n_threads(ctx, 1, 1)
        return 1
    speeds: dict[int, float] = {}
    rows = max(1, min(PROBE_ROWS, room // (PROBE_STEPS + 1)))
    batch = lib.llama_batch_init(rows, 0, 1)
    try:
        for _ in range(PROBE_ROUNDS):
            for threads in candidates:
                lib.llama_set_n_threads(ctx, threads, threads)
                speed = _tokens_per_second(lib, ctx, memory, batch, token, rows)
                speeds[threads] = max(speeds.get(threads, 0.0), speed)
    finally:
        lib.llama_batch_free(batch)
    chosen = choose_layout(cpus, speeds, MIN_DOUBLING_GAIN)[1]
    lone = lone_step_threads(chosen)
    lib.llama_set_n_threads(ctx, lone, chosen)
    log.info(
        "llama.cpp threads: %d (steps of %d tokens, tokens/s by threads: %s); %d for a "
        "one-token step",
        chosen,
        rows,
        ", ".join(f"{t}: {s:.1f}" for t, s in speeds.items()),
        lone,
    )
    return chosen


def lone_step_threads(batch_threads: int) -> int:
    """Threads for a step of one token (one stream decoding alone; llama.cpp's `n_threads`,
    where `n_threads_batch` serves every larger step): one CPU fewer than a batch's.

    A lone stream's serving path (the gRPC or HTTP stream, detokenizing, the bridge into
    trio) runs in Python beside every one of its steps; with every CPU in llama.cpp's
    threads it waits for one. On the quiet 2-core AMD EPYC, one stream through gRPC (Q8_0,
    64 tokens) ran at 77-79 tokens/s with 2 threads and 100 with 1, where a busy step
    still wants both (8-token steps: 1.64-1.74x)."""
    return max(1, batch_threads - 1)


def _tokens_per_second(
    lib: Any, ctx: Any, memory: Any, batch: Any, token: int, rows: int = PROBE_ROWS
) -> float:
    """Tokens per second of PROBE_STEPS steps of `rows` tokens each (one sequence's
    consecutive positions: the same matrix products as as many sequences' decode rows)."""
    started = 0.0
    for step in range(PROBE_STEPS + 1):
        if step == 1:
            started = time.perf_counter()  # the first step warms caches up: not timed
        batch.n_tokens = rows
        for row in range(rows):
            batch.token[row] = token
            batch.pos[row] = step * rows + row
            batch.n_seq_id[row] = 1
            batch.seq_id[row][0] = PROBE_SEQUENCE
            batch.logits[row] = 1
        if lib.llama_decode(ctx, batch) != 0:
            break
    elapsed = time.perf_counter() - started
    lib.llama_memory_seq_rm(memory, PROBE_SEQUENCE, -1, -1)
    return PROBE_STEPS * rows / elapsed if elapsed > 0 else 0.0
