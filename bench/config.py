"""What one benchmark run does: scenarios, concurrency levels, lengths, durations."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.records import (
    CT2_BATCH,
    CT2_STREAM,
    GATEWAY,
    LLAMA_CPP,
    OPENAI_HTTP,
    TRANSFORMERS,
    VARIANT_SCENARIOS,
)
from bench.slo import DEFAULT_TPOT_S, DEFAULT_TTFT_S
from bench.studies import STUDY_SCENARIOS

ALL_SCENARIOS = (
    CT2_STREAM,
    CT2_BATCH,
    *VARIANT_SCENARIOS,
    OPENAI_HTTP,
    LLAMA_CPP,
    GATEWAY,
    # In-process llama_cpp studies of one feature each (bench/studies.py): after the
    # servers, before torch, so the bench process stays small while it drives servers.
    *STUDY_SCENARIOS,
    TRANSFORMERS,
)
# The open loop's targets: every llm-local variant, and llama.cpp's server.
GATEWAY_TARGETS = (*VARIANT_SCENARIOS, LLAMA_CPP)

# Prompts that make a small instruct model write long answers: with greedy decoding
# almost every request then runs to max_new_tokens in every scenario, so the engines do
# comparable work even though the end-of-sequence token cannot be ignored everywhere.
# Client i sends prompt (i + n) % len(PROMPTS) as its n-th request, in every scenario.
PROMPTS = (
    "Write a detailed essay of several paragraphs about the history of the Roman Empire, "
    "from its founding to its fall.",
    "Explain step by step how a computer processor executes a program, with an example "
    "for every step.",
    "Describe in detail every stage of the water cycle and why each one matters for life on Earth.",
    "Write a long story about a young explorer who discovers a hidden city in the mountains.",
    "List and explain twenty tips for learning a new programming language effectively.",
    "Give a thorough overview of how the human immune system protects the body against infections.",
    "Explain the causes, the major events and the consequences of the Industrial Revolution "
    "in detail.",
    "Write a detailed month-by-month guide to growing vegetables in a home garden.",
)

FULL_STREAMS = (1, 4, 16, 32)
QUICK_STREAMS = (1, 4)

# llama.cpp's server: FINDINGS.md's setup (-t 2 -np 32 -c 16384): 512 context tokens per
# slot, enough for these prompts and 128 new tokens.
# BENCH_LLAMA_CPP_THREADS overrides the thread count, e.g. to match what the llama_cpp backend
# measured at load on a shared machine (where 2 threads stall at llama.cpp's barriers).
LLAMA_CPP_THREADS = int(os.environ.get("BENCH_LLAMA_CPP_THREADS", "2"))
LLAMA_CPP_SLOTS = 32
LLAMA_CPP_CONTEXT = 16384


# The backends scenario call-turns drives in process (bench/call_turns.py).
CALL_BACKENDS = ("llama_cpp", "transformers")


@dataclass(frozen=True, slots=True)
class BenchConfig:
    scenarios: tuple[str, ...] = ALL_SCENARIOS
    streams: tuple[int, ...] = FULL_STREAMS
    max_new_tokens: int = 128
    reference_tokens: int = 64  # transformers is ~40× slower: fewer tokens, same rate
    duration_s: float = 20.0  # closed-loop time per concurrency level
    # Sequential scenarios (one stream in-process, transformers) stop after this many
    # requests even when time is left: their rate is steady after a few.
    max_sequential_requests: int = 12
    quick: bool = False
    build_peer: bool = False
    model_dir: Path | None = None  # the converted CTranslate2 model
    gguf_path: Path | None = None
    hf_dir: Path | None = None  # a float32 transformers directory; None = from the GGUF
    llama_server: Path | None = None
    results_dir: Path = Path("bench/results")
    docs_dir: Path | None = None  # None = docs/ (full) or next to the results (quick)
    prompts: tuple[str, ...] = PROMPTS
    # The open loop (bench/scenarios/gateway.py). Per target and rate: at least
    # `level_s` of Poisson arrivals, longer (up to `max_level_s`) until about
    # `min_requests` arrive.
    # The sweep starts where a server that served one request at a time would be busy
    # (measured), doubles until the SLO is missed, then bisects `refinements` times:
    # about 5-7 levels of 15-30 s (plus the time the last requests take) per target.
    gateway_targets: tuple[str, ...] = GATEWAY_TARGETS
    slo_ttft_s: float = DEFAULT_TTFT_S
    slo_tpot_s: float = DEFAULT_TPOT_S
    gateway_seed: int = 11
    gateway_level_s: float = 15.0
    gateway_max_level_s: float = 30.0
    gateway_min_requests: int = 20
    gateway_rates: tuple[float, ...] | None = None  # explicit rates instead of the sweep
    gateway_max_levels: int = 7
    gateway_refinements: int = 2
    # After the levels, the mix with LLAMA_CPP_SLOTS requests always in flight for this
    # long: what the server completes when saturated, which bounds any capacity at SLO on
    # the machine (0 skips it).
    gateway_saturation_s: float = 30.0
    # The client's safety bound on requests in flight (an arrival beyond it is recorded
    # as failed); far above the server's own admission limits.
    gateway_max_in_flight: int = 512
    # call-turns (bench/call_turns.py): levels of concurrent calls, turns per call, the
    # caller's think time between turns, new tokens per answer. Issue 22's call is 12
    # turns, one call alone and 8 at once; 4 keeps a 2-core machine's run short.
    call_levels: tuple[int, ...] = (1, 4)
    call_backends: tuple[str, ...] = CALL_BACKENDS  # in process; transformers needs torch
    call_turns: int = 12
    call_think_s: float = 1.0
    call_max_new_tokens: int = 32
    # structured (bench/structured.py speed): levels, new tokens, interleaved rounds.
    structured_streams: tuple[int, ...] = (1, 16)
    structured_tokens: int = 64
    structured_rounds: int = 3
    # lora (bench/llama_cpp_lora.py): streams and new tokens per stream.
    lora_streams: int = 16
    lora_tokens: int = 64

    @classmethod
    def quick_preset(cls) -> BenchConfig:
        return cls(
            streams=QUICK_STREAMS,
            max_new_tokens=16,
            reference_tokens=8,
            duration_s=2.0,
            max_sequential_requests=3,
            quick=True,
            gateway_level_s=4.0,
            gateway_max_level_s=8.0,
            gateway_min_requests=4,
            gateway_max_levels=2,
            gateway_refinements=0,
            # Seven turns: the fewest whose first three and last four are apart.
            call_levels=(1,),
            call_turns=7,
            call_think_s=0.0,
            call_max_new_tokens=4,
            structured_streams=(1, 4),
            structured_tokens=8,
            structured_rounds=1,
            lora_streams=4,
            lora_tokens=8,
        )

    def as_json(self) -> dict[str, object]:
        values = asdict(self)
        return {
            key: str(value) if isinstance(value, Path) else value for key, value in values.items()
        }

    def prompt_for(self, client: int, sequence: int) -> int:
        """Index into `prompts` of client `client`'s `sequence`-th request."""
        return (client + sequence) % len(self.prompts)
