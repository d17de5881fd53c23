"""How many threads llama.cpp decodes with, when `threads = "auto"`: measured at load.

llama.cpp's CPU kernels meet at a barrier after every operation (hundreds per step). When
the process's CPUs are shared (other processes, a busy host), a thread descheduled at a
barrier stalls all the others: on the 2-core development machine, shared with three other
test runs, 2 threads decoded 1.6 tokens/s where 1 thread decoded 73. So the count is not
assumed from the CPUs we may use: at load one short decode is timed at 1, 2, 4, ... threads
(up to those CPUs, `shared.threads.usable_cpus`) and the shared rule
(`shared.threads.choose_layout`) picks, with its own bar: a doubling must pay
`MIN_DOUBLING_GAIN` (1.15x), not the 1.5x ct2 asks. ct2 can spend a CPU a batch does not
take on a second worker; here one context decodes everything, so a CPU the decoding threads
leave goes unused, and a thread need only pay for itself beyond the measurement's noise. (At
1.5x, the 2-core AMD machine, quiet, flipped between 1 and 2 threads at a measured 1.46x,
and the 1-thread server served 73 / 117 / 117 tokens/s at 1 / 16 / 32 streams where 2
threads served 88 / 187 / 143 in the same run: docs/FINDINGS.md.) It takes well under a
second for a small model and follows the machine the service really runs on; a loaded
machine's second thread, stalling at every barrier, fails any bar (1.6 against 73).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from llm_local.backends.shared.threads import choose_layout, intra_candidates

log = logging.getLogger("llm_local.backends.llama_cpp")

MIN_DOUBLING_GAIN = 1.15
PROBE_STEPS = 8  # decoding steps timed per thread count and round (after a warm-up step)
# Rounds over the thread counts, interleaved; each count keeps its fastest round. Whatever
# else runs can only slow a round down, and one probe round is ~0.1 s: on the quiet 2-core
# AMD machine a single round once measured 2 threads below the bar, and that server served
# the gateway's 0.92 req/s at TPOT p95 491 ms where 2 threads had met the SLO at 0.841.
PROBE_ROUNDS = 3
PROBE_SEQUENCE = 0  # the sequence the probe borrows; freed before serving starts


def measure_threads(lib: Any, ctx: Any, memory: Any, token: int, cpus: int) -> int:
    """The thread count to decode with, from one-stream speeds measured now (each
    count's fastest of PROBE_ROUNDS interleaved rounds)."""
    candidates = intra_candidates(cpus)
    if len(candidates) == 1:
        lib.llama_set_n_threads(ctx, 1, 1)
        return 1
    speeds: dict[int, float] = {}
    batch = lib.llama_batch_init(1, 0, 1)
    try:
        for _ in range(PROBE_ROUNDS):
            for threads in candidates:
                lib.llama_set_n_threads(ctx, threads, threads)
                speed = _tokens_per_second(lib, ctx, memory, batch, token)
                speeds[threads] = max(speeds.get(threads, 0.0), speed)
    finally:
        lib.llama_batch_free(batch)
    chosen = choose_layout(cpus, speeds, MIN_DOUBLING_GAIN)[1]
    lib.llama_set_n_threads(ctx, chosen, chosen)
    log.info(
        "llama.cpp threads: %d (one stream, tokens/s by threads: %s)",
        chosen,
        ", ".join(f"{t}: {s:.1f}" for t, s in speeds.items()),
    )
    return chosen


def _tokens_per_second(lib: Any, ctx: Any, memory: Any, batch: Any, token: int) -> float:
    started = 0.0
    for position in range(PROBE_STEPS + 1):
        if position == 1:
            started = time.perf_counter()  # the first step warms caches up: not timed
        batch.n_tokens = 1
        batch.token[0] = token
        batch.pos[0] = position
        batch.n_seq_id[0] = 1
        batch.seq_id[0][0] = PROBE_SEQUENCE
        batch.logits[0] = 1
        if lib.llama_decode(ctx, batch) != 0:
            break
    elapsed = time.perf_counter() - started
    lib.llama_memory_seq_rm(memory, PROBE_SEQUENCE, -1, -1)
    return PROBE_STEPS / elapsed if elapsed > 0 else 0.0
