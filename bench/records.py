"""What one measured run produces: plain data, no I/O.

Times are `time.perf_counter()` seconds of the benchmark process. A *level* is one
scenario at one concurrency (number of streams); its records are the requests it sent.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

# Scenario keys, in the order they are reported.
CT2_STREAM = "ct2-stream"
CT2_BATCH = "ct2-batch"
GRPC = "grpc"
OPENAI_HTTP = "http-sse"
# The gRPC requests the http-sse scenario alternates with its own (a row, not a scenario).
GRPC_PAIRED = "grpc-paired"
LLAMA_CPP = "llama.cpp"
TRANSFORMERS = "transformers"
# The open-loop, gateway-shaped scenario (its rows are per target and offered rate).
GATEWAY = "gateway"


@dataclass(frozen=True, slots=True)
class ServerVariant:
    """`llm-local serve` with some settings overridden (environment variables)."""

    scenario: str  # its closed-loop scenario's key; its target name in the open loop
    label: str
    environment: Mapping[str, str] = field(default_factory=dict)


GRPC_TRANSFORMERS = "grpc-transformers"
GRPC_LLAMA_CPP = "grpc-llama-cpp"
# A pinned extra row, never the headline: the llama_cpp backend with llama-server's KV
# layout and size in this benchmark (a stream of 512 cells per sequence, -np 32 -c 16384),
# so that the scheduler is compared with the server's on the same memory layout.
GRPC_LLAMA_CPP_STREAMS = "grpc-llama-cpp-streams"

# Every llm-local configuration the benchmark drives: each is a closed-loop scenario of
# its own (gRPC, same levels) and a target of the open-loop sweep. Adding one is one line.
SERVER_VARIANTS = (
    ServerVariant(GRPC, "llm-local gRPC server"),
    ServerVariant(
        GRPC_TRANSFORMERS,
        "llm-local gRPC server, transformers backend (unconverted model, continuous batching)",
        {"LLM_LOCAL_SERVICE_BACKEND": "transformers"},
    ),
    ServerVariant(
        GRPC_LLAMA_CPP,
        "llm-local gRPC server, llama_cpp backend (the GGUF as is, our continuous batching)",
        {"LLM_LOCAL_SERVICE_BACKEND": "llama_cpp"},
    ),
    ServerVariant(
        GRPC_LLAMA_CPP_STREAMS,
        "llm-local gRPC server, llama_cpp backend pinned to llama-server's KV layout "
        "(kv_layout per_sequence, 32 x 512 cells; an extra row)",
        {
            "LLM_LOCAL_SERVICE_BACKEND": "llama_cpp",
            "LLM_LOCAL_SERVICE_LLAMA_CPP__KV_LAYOUT": "per_sequence",
            "LLM_LOCAL_SERVICE_LLAMA_CPP__KV_CACHE_TOKENS": "16384",
            "LLM_LOCAL_SERVICE_LLAMA_CPP__SEQUENCES": "32",
        },
    ),
)
VARIANT_SCENARIOS = tuple(variant.scenario for variant in SERVER_VARIANTS)

SCENARIO_ORDER = (
    TRANSFORMERS,
    CT2_STREAM,
    CT2_BATCH,
    *VARIANT_SCENARIOS,
    GRPC_PAIRED,
    OPENAI_HTTP,
    LLAMA_CPP,
    GATEWAY,
)

SCENARIO_LABELS = {
    CT2_STREAM: "in-process CTranslate2, generate_tokens",
    CT2_BATCH: "in-process CTranslate2, generate_batch on 2 workers (ceiling)",
    **{variant.scenario: variant.label for variant in SERVER_VARIANTS},
    OPENAI_HTTP: "llm-local OpenAI API, /v1/chat/completions streamed (SSE), one stream",
    GRPC_PAIRED: "llm-local gRPC, one stream, alternating with http-sse on the same server",
    LLAMA_CPP: "llama.cpp server (peer)",
    TRANSFORMERS: "transformers generate, float32 (reference)",
    GATEWAY: "open loop shaped like the gateway: Poisson arrivals at swept rates, "
    "llm-local (every server variant) and llama.cpp's server",
}


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """One request as the client saw it."""

    client: int  # which closed-loop client sent it
    start: float  # request sent
    end: float  # stream finished (or failed)
    tokens: int  # tokens generated: the server's own count when it reports one
    first_token: float | None = None  # first token arrived; None when not observable
    # Arrival time of every streamed message that carried generated text. Empty when the
    # scenario cannot observe tokens one by one (a whole batch returns at once).
    message_times: tuple[float, ...] = ()
    finish_reason: str | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @classmethod
    def streamed(
        cls,
        client: int,
        start: float,
        end: float,
        arrivals: Sequence[float],
        *,
        tokens: int | None = None,
        finish_reason: str | None = None,
        error: str | None = None,
    ) -> RequestRecord:
        """A request whose text messages arrived at `arrivals`; `tokens` defaults to one
        per message when the peer reports no count of its own."""
        return cls(
            client=client,
            start=start,
            end=end,
            tokens=tokens if tokens is not None else len(arrivals),
            first_token=arrivals[0] if arrivals else None,
            message_times=tuple(arrivals),
            finish_reason=finish_reason,
            error=error,
        )


@dataclass(frozen=True, slots=True)
class ProcessUsage:
    """Resources one process used during a level (the server's, or the client's own)."""

    cpu_seconds: float  # user + system CPU time spent during the level
    peak_rss_bytes: int | None  # the process's high-water mark so far; None if unknown


@dataclass(frozen=True, slots=True)
class LevelRun:
    """One scenario at one concurrency: the raw material of a table row."""

    scenario: str
    streams: int
    records: tuple[RequestRecord, ...]
    # The steady-state window aggregate throughput is computed over: from the start of
    # the level until the first client ran out of work (after that, fewer than `streams`
    # requests are in flight).
    window: tuple[float, float]
    server: ProcessUsage | None = None  # the serving process, when it is another process
    client: ProcessUsage | None = None  # the benchmark process itself
    notes: tuple[str, ...] = field(default=())


@dataclass(frozen=True, slots=True)
class RateRun:
    """One open-loop level: one target (server) at one offered rate."""

    target: str  # a server variant's scenario key, or LLAMA_CPP
    rate: float  # offered requests per second (the Poisson process's rate)
    records: tuple[RequestRecord, ...]
    window: tuple[float, float]  # the arrival window: requests were sent within it
    notes: tuple[str, ...] = field(default=())


@dataclass(frozen=True, slots=True)
class Skipped:
    """A scenario that did not run, and why (shown in the table and the report)."""

    scenario: str
    reason: str
