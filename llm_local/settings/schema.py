"""Typed, frozen settings: what the rest of the code receives instead of dynaconf.

The loader (loader.py) validates the layered dynaconf settings and builds these.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Device = Literal["auto", "cpu", "cuda"]
ComputeType = Literal[
    "auto",
    "int8",
    "int8_float16",
    "int8_bfloat16",
    "int8_float32",
    "int16",
    "float16",
    "bfloat16",
    "float32",
]
LogFormat = Literal["text", "json"]
TorchDType = Literal["auto", "float32", "bfloat16", "float16"]
AttentionImplementation = Literal["sdpa", "eager", "flash_attention_2"]
Threads = int | Literal["auto"]
PageTokens = int | Literal["auto"]
PrefixIsolation = Literal["none", "tenant"]
KvLayout = Literal["pool", "per_sequence"]
LlamaCppWeights = Literal["auto", "as_is", "q8_0", "bf16", "f16"]


@dataclass(frozen=True, slots=True)
class ModelSettings:
    # A hub repo id ("microsoft/Phi-3-mini-4k-instruct"), a local HF model directory,
    # a .gguf file, or "package:DIST/PATH" (a file inside an installed distribution).
    name: str
    revision: str | None  # hub revision (branch, tag or commit); None = default branch
    # Weight quantization of the converted model. "auto": compute_type when that is
    # explicit, else int8 on CPU and float16 on CUDA. Loading may still use another
    # compute_type (CTranslate2 converts at load time), e.g. float32 in tests.
    quantization: ComputeType
    cache_dir: Path  # converted models live here
    download_dir: Path | None  # hub downloads; None = huggingface_hub's own cache
    offline: bool  # never reach the hub (HF_HUB_OFFLINE)
    context_limit: int  # 0 = what the model's config says
    load_retries: int  # attempts after a failed load before staying "failed"
    load_retry_backoff_s: float  # first wait; doubles each attempt
    convert_on_start: bool  # `serve` converts when the cache lacks the model


@dataclass(frozen=True, slots=True)
class RuntimeSettings:
    """Where and how the model runs (CTranslate2 terms, but any backend may use them)."""

    device: Device
    device_index: int
    compute_type: ComputeType
    # "auto" (both): from the CPUs this process may use and measured thread scaling
    # (backends/shared/threads.py); numbers win.
    inter_threads: Threads  # parallel batches (workers)
    intra_threads: Threads  # threads inside one batch; 0 = CTranslate2's default
    max_batch_size: int  # requests decoded together in one batch
    batch_wait_ms: float  # how long a lone request waits for company before decoding
    # The same wait while a batch is already decoding (under load company comes soon).
    busy_batch_wait_ms: float
    # The time to first token to keep under load: past it, waiting requests start on an
    # extra lane (one more model replica); 0 = no target, no lane.
    ttft_target_ms: float
    # Memory for cached shared prompt prefixes (system prompts); 0 = no prefix caching.
    prefix_cache_mb: float


@dataclass(frozen=True, slots=True)
class TransformersSettings:
    """The `transformers` backend's own options (backends/transformers): the model runs
    unconverted in PyTorch, its requests decoded by transformers' continuous batching."""

    dtype: TorchDType  # "auto": bfloat16 on CUDA and on CPUs with native bfloat16, else float32
    attn_implementation: AttentionImplementation
    max_requests_per_batch: int  # requests decoded in one step; the rest wait their turn
    # Tokens one step may process (prompt chunks plus one per decoding request);
    # 0 = transformers sizes it from free memory.
    max_batch_tokens: int
    # Tokens the paged KV cache holds for all requests together; 0 = transformers sizes
    # it from free device memory (right on a GPU of its own, far too much on a shared CPU).
    kv_cache_tokens: int
    # Tokens per page of the paged KV cache, the unit transformers allocates and shares:
    # a new prompt reuses an earlier request's state in whole pages only. "auto": 256 with
    # flash_attention_2 (its paged decode kernel's page), 16 otherwise.
    page_tokens: PageTokens
    # Finished requests' complete pages stay in the KV cache for later prompts that start
    # with the same tokens (a call's next turn): memory the kept pages may hold, least
    # recently used go first. 0 = no reuse (no page is shared between requests).
    prefix_cache_mb: float
    # "tenant": a tenant reuses only its own prefixes; "none": any exact prefix.
    prefix_isolation: PrefixIsolation
    # PyTorch's CPU threads; "auto": the CPUs this process may use (affinity, cgroup quota),
    # where PyTorch alone would take the host's cores, quota or not.
    threads: Threads
    # A `.gguf` source's dequantized weights are kept in model.cache_dir (4 bytes a
    # parameter) and read as they are at later starts, instead of dequantized again.
    keep_dequantized: bool


@dataclass(frozen=True, slots=True)
class LlamaCppSettings:
    """The `llama_cpp` backend's own options (backends/llama_cpp): the GGUF served as is by
    llama.cpp's library, its requests decoded by our continuous-batching scheduler."""

    # Tokens the KV cache holds for all requests together: in one pool (`kv_layout`
    # "pool") a request starts only when its prompt + max_new_tokens fit what the running
    # ones left; "per_sequence" gives each sequence an equal share of its own.
    # 0 = the model's training context.
    kv_cache_tokens: int
    # "pool": every sequence draws cells from one pool (a long call may take most of it),
    # at the price of attention scanning the pool's whole used range each step;
    # "per_sequence": a stream per sequence, as llama-server runs by default (cheaper
    # steps with many short requests, but no request may outgrow its share).
    kv_layout: KvLayout
    sequences: int  # requests decoded together (llama.cpp sequences); more wait their turn
    # Prompt tokens read per step while other requests decode: the newcomer's wait
    # against the running streams' pace.
    prefill_chunk_tokens: int
    gpu_layers: int  # layers offloaded to a GPU (a CUDA build of the library); 0 = CPU only
    threads: Threads  # "auto": the CPUs this process may use (affinity, cgroup quota)
    # llama.cpp's extra weight layouts (repacking for AMX, AArch64 kernels): off, because
    # the AMX path takes the process down at the first decode (docs/FINDINGS.md).
    repack: bool
    # The weights served: "as_is" (as stored), a re-laid copy ("q8_0", "bf16", "f16"),
    # or "auto": the file or its Q8_0 copy, whichever this machine measures cheaper
    # without slowing a lone stream (backends/llama_cpp/weights.py).
    weights: LlamaCppWeights
    # Finished requests' sequences stay in the KV cache for later prompts that extend them
    # (a call's next turn): memory the kept ones may hold, in the pool (at the model's KV
    # bytes per token) or saved to host memory; least recently used go first. 0 = no reuse.
    prefix_cache_mb: float
    # "tenant": a tenant reuses only its own prefixes (cached ones are visible through
    # timing); "none": any request reuses any exact prefix.
    prefix_isolation: PrefixIsolation


@dataclass(frozen=True, slots=True)
class NumericsSettings:
    """How a compute type is checked against the unquantized model (core/numerics.py)."""

    max_nll_ratio: float  # NLL of the reference answers over the reference's own
    min_agreement_ratio: float  # greedy agreement over float32's on the same weights
    # An explicit compute_type that fails the check serves anyway, with a warning.
    accept_unverified: bool
    check_at_load: bool  # run the check at every load (off: trust the cached verdict)
    # Where auto's verdicts are cached; None = beside the model (a read-only model cache
    # needs a writable directory here, or every start measures again).
    verdict_dir: Path | None


@dataclass(frozen=True, slots=True)
class GenerationDefaults:
    """Used when the request leaves a parameter unset."""

    max_new_tokens: int
    max_new_tokens_limit: int  # the largest a request may ask for
    temperature: float
    top_k: int
    top_p: float
    repetition_penalty: float
    max_stop_sequences: int
    max_stop_sequence_length: int  # characters
    # Structured output (core/structured/limits.py): a request's schemas together, in bytes
    # of JSON; their deepest nesting; the tools one request may declare.
    max_schema_bytes: int = 65536
    max_schema_depth: int = 32
    max_tools: int = 64


@dataclass(frozen=True, slots=True)
class CapacitySettings:
    max_concurrent: int  # generations decoding at once
    max_queued: int  # generations waiting; beyond this: RESOURCE_EXHAUSTED
    queue_timeout_s: float  # the longest a request waits for a slot
    # Running + queued generations one tenant (x-tenant-id) may hold; 0 = no limit.
    max_per_tenant: int


@dataclass(frozen=True, slots=True)
class TLSSettings:
    cert_path: Path | None  # server certificate (PEM); None = plain h2c
    key_path: Path | None
    ca_path: Path | None  # set = mTLS: client certificates signed by this CA are required

    @property
    def enabled(self) -> bool:
        return self.cert_path is not None

    @property
    def mutual(self) -> bool:
        return self.ca_path is not None


@dataclass(frozen=True, slots=True)
class ServerSettings:
    host: str
    http_port: int
    grpc_port: int
    metrics_port: int  # 0 = metrics only on the HTTP port's /metrics
    require_tenant_id: bool
    grace_period_s: float  # on SIGTERM, how long running streams may finish
    slow_start_s: float  # test-only: delay before loading, to observe "loading"
    # A stream whose client has not taken a text chunk for this long (it stopped
    # reading) is cancelled and its slot freed.
    stall_timeout_s: float
    # Tenants with their own label in /metrics (the first seen); later ones are "other".
    metrics_tenant_labels: int
    # A gRPC connection this old gets GOAWAY (its client reconnects and finds replicas
    # started since); 0 = connections live for ever. Spread by +-10 % per connection.
    grpc_max_connection_age_s: float
    # How long the calls running on such a connection may still take before it closes.
    grpc_max_connection_age_grace_s: float


@dataclass(frozen=True, slots=True)
class OpenAISettings:
    """The OpenAI-compatible HTTP API (/v1/*) on the HTTP port."""

    # Bearer keys /v1/* accepts; empty = no key required. A secret: /config redacts it.
    api_keys: tuple[str, ...]
    model_id: str | None  # the id /v1/models lists; None = derived from model.name
    max_body_bytes: int  # larger request bodies: 413
    max_messages: int  # more chat messages: 400
    max_prompt_chars: int  # a longer prompt (all message texts together): 400


@dataclass(frozen=True, slots=True)
class LimitsSettings:
    """What one client may send before it is refused (never buffered without bound)."""

    # A gRPC request message longer than this (its length prefix says so before a byte of
    # it is read) ends the call with RESOURCE_EXHAUSTED.
    grpc_max_message_bytes: int
    # Headers + metadata of one gRPC call (HTTP/2 SETTINGS_MAX_HEADER_LIST_SIZE).
    grpc_max_metadata_bytes: int
    # gRPC calls open at once on one connection (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS).
    grpc_max_concurrent_streams: int
    # The same two for the HTTP port (hypercorn): streams per HTTP/2 connection, and the
    # request line + headers of an HTTP/1.1 request or the header list of an HTTP/2 one.
    http_max_concurrent_streams: int
    http_max_header_bytes: int


@dataclass(frozen=True, slots=True)
class LoggingSettings:
    level: str
    format: LogFormat
    # Prompts (and the rest of a request's text) appear in DEBUG lines only when this is
    # on: they are user data, often personal, and logs travel further than requests.
    log_prompts: bool = False


@dataclass(frozen=True, slots=True)
class AdapterSettings:
    """One LoRA adapter requests may name ([adapters]: id = source)."""

    id: str  # what a request names (lora_adapter_id; OpenAI `model` "base:id" or "id")
    # A PEFT adapter directory, a Hugging Face Hub repo id holding one, a .gguf LoRA file
    # (llama_cpp only), or "package:DIST/PATH". `llm-local convert` prepares it.
    source: str


@dataclass(frozen=True, slots=True)
class AppSettings:
    env: str
    backend: str
    model: ModelSettings
    runtime: RuntimeSettings
    transformers: TransformersSettings
    llama_cpp: LlamaCppSettings
    numerics: NumericsSettings
    generation: GenerationDefaults
    capacity: CapacitySettings
    server: ServerSettings
    tls: TLSSettings
    openai: OpenAISettings
    limits: LimitsSettings
    logging: LoggingSettings
    # Everything as loaded (secrets included): the /config route redacts it.
    raw: dict[str, object]
    adapters: tuple[AdapterSettings, ...] = ()  # in id order
